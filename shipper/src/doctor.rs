//! `cis490-shipper doctor`: one screen for the person on call. Checks the config, certificates,
//! receiver, commit admission, queue and disk, asks the running daemon (its metrics listener and
//! its journal) which version it runs and whether its binary is stale, then classifies the
//! shipper's recent log lines.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::config::Config;
use crate::host;
use crate::metrics;
use crate::queue::Queue;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Red,
    Yellow,
    Info,
    Green,
}

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub level: Level,
    pub check: String,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

fn row(level: Level, check: &str, detail: impl Into<String>, fix: Option<String>) -> Row {
    Row {
        level,
        check: check.to_string(),
        detail: detail.into(),
        fix,
    }
}

/// Counts found in the log window.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct LogCounts {
    pub lines: usize,
    pub out_of_window: usize,
    pub malformed: usize,
    pub transient: usize,
    pub shipped: usize,
    pub other_rejected: usize,
    /// Set aside by the shipper itself (unstamped, unsupported entries): no HTTP status.
    pub local_rejected: usize,
}

/// One log line: its time if it carries one, and its text.
#[derive(Debug, Clone)]
pub struct LogLine {
    pub time: Option<SystemTime>,
    pub text: String,
}

/// Parses journalctl's JSON lines or the shipper's own text lines.
pub fn parse_log(text: &str) -> Vec<LogLine> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(l) {
                if v.is_object() {
                    let time = v
                        .get("__REALTIME_TIMESTAMP")
                        .and_then(|t| t.as_str())
                        .and_then(|t| t.parse::<u64>().ok())
                        .map(|us| UNIX_EPOCH + Duration::from_micros(us));
                    let msg = match v.get("MESSAGE") {
                        Some(serde_json::Value::String(s)) => s.clone(),
                        // journald stores non-UTF-8 messages as byte arrays.
                        Some(serde_json::Value::Array(a)) => String::from_utf8_lossy(
                            &a.iter()
                                .filter_map(|b| b.as_u64().map(|b| b as u8))
                                .collect::<Vec<_>>(),
                        )
                        .into_owned(),
                        _ => String::new(),
                    };
                    return LogLine { time, text: msg };
                }
            }
            let time = l
                .split_whitespace()
                .next()
                .and_then(|w| humantime::parse_rfc3339_weak(w.trim_end_matches('Z')).ok());
            LogLine {
                time,
                text: l.to_string(),
            }
        })
        .collect()
}

fn field<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    let key = format!("{name}=");
    let start = text.find(&key)? + key.len();
    let rest = &text[start..];
    let rest = rest.strip_prefix('"').unwrap_or(rest);
    let end = rest.find(['"', ' ']).unwrap_or(rest.len());
    Some(&rest[..end])
}

/// Classifies lines newer than `since` (lines without a time always count).
pub fn classify(lines: &[LogLine], since: SystemTime) -> LogCounts {
    let mut c = LogCounts::default();
    for l in lines {
        if l.time.is_some_and(|t| t < since) {
            continue;
        }
        c.lines += 1;
        match field(&l.text, "event") {
            Some("ship_rejected") => match field(&l.text, "status") {
                Some("412") => c.out_of_window += 1,
                Some("400") | Some("411") => c.malformed += 1,
                None => c.local_rejected += 1,
                _ => c.other_rejected += 1,
            },
            Some("ship_transient") => c.transient += 1,
            Some("shipped") => c.shipped += 1,
            _ => {}
        }
    }
    c
}

/// The journal rows, 412 first (SPEC §7).
pub fn log_rows(c: &LogCounts, window: &str, fix_412: &str) -> Vec<Row> {
    let mut rows = Vec::new();
    if c.out_of_window > 0 {
        rows.push(row(
            Level::Red,
            "journal",
            format!("{} ship(s) rejected as out-of-window (412) in the last {window}: this host runs stale code", c.out_of_window),
            Some(fix_412.to_string()),
        ));
    }
    if c.malformed > 0 {
        rows.push(row(
            Level::Red,
            "journal",
            format!("{} ship(s) rejected as malformed (400) in the last {window}", c.malformed),
            Some("update the shipper (sudo /opt/cis490/scripts/install-lab-host.sh) and see quarantine/*/quarantine_reason.json".into()),
        ));
    }
    if c.other_rejected > 0 {
        rows.push(row(
            Level::Yellow,
            "journal",
            format!(
                "{} ship(s) refused for other reasons (401/403/409/413/422) in the last {window}",
                c.other_rejected
            ),
            Some("cis490-shipper status; see quarantine/*/quarantine_reason.json".into()),
        ));
    }
    if c.local_rejected > 0 {
        rows.push(row(
            Level::Yellow,
            "journal",
            format!("{} episode(s) set aside on this host in the last {window} (no commit stamp, or symlinks/devices inside)", c.local_rejected),
            Some("fix the producer; see quarantine/*/quarantine_reason.json".into()),
        ));
    }
    if c.transient > 0 {
        rows.push(row(
            Level::Yellow,
            "journal",
            format!(
                "{} transient error(s) in the last {window} (retried with backoff)",
                c.transient
            ),
            None,
        ));
    }
    if c.shipped > 0 && c.out_of_window == 0 && c.malformed == 0 {
        rows.push(row(
            Level::Green,
            "journal",
            format!(
                "{} episode(s) shipped cleanly in the last {window}",
                c.shipped
            ),
            None,
        ));
    } else if c.shipped > 0 {
        rows.push(row(
            Level::Info,
            "journal",
            format!("{} episode(s) shipped in the last {window}", c.shipped),
            None,
        ));
    }
    if rows.is_empty() {
        rows.push(row(
            Level::Info,
            "journal",
            format!(
                "no shipping activity in the last {window} ({} log line(s))",
                c.lines
            ),
            None,
        ));
    }
    rows
}

/// Reads the log: a file, or `journalctl -u cis490-shipper -o json`.
fn read_log(log_file: Option<&Path>, since: SystemTime) -> Result<String, Row> {
    if let Some(f) = log_file {
        return std::fs::read_to_string(f).map_err(|e| {
            row(
                Level::Yellow,
                "journal",
                format!("cannot read {}: {e}", f.display()),
                None,
            )
        });
    }
    let secs = since.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let not_readable = |why: String| {
        row(
            Level::Yellow,
            "journal",
            format!("journal not readable: {why}"),
            Some("run doctor with sudo, or join the systemd-journal group: sudo usermod -aG systemd-journal $USER (then log in again)".into()),
        )
    };
    let out = Command::new("journalctl")
        .args([
            "-u",
            "cis490-shipper",
            "-o",
            "json",
            "--no-pager",
            "--since",
        ])
        .arg(format!("@{secs}"))
        .output()
        .map_err(|e| not_readable(format!("journalctl: {e}")))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Without access journalctl may still exit 0, showing only the caller's own entries.
    if !out.status.success()
        || stderr.contains("insufficient permissions")
        || stderr.contains("No journal files were opened")
        || stderr.contains("not seeing messages from other users")
    {
        return Err(not_readable(
            stderr
                .lines()
                .next()
                .unwrap_or("journalctl failed")
                .to_string(),
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The journal lines that say how the daemon started and whether its binary went stale,
/// however old: `journalctl --grep` for them (the last 100). `None` when journalctl cannot
/// (no journal access, or built without pattern matching); the caller then has the `--since`
/// window only.
fn read_daemon_journal() -> Option<String> {
    let out = Command::new("journalctl")
        .args([
            "-u",
            "cis490-shipper",
            "-o",
            "json",
            "--no-pager",
            "-n",
            "100",
            "--grep",
            "shipper started|stale_binary",
        ])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// What the log says about the daemon's latest start.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DaemonLog {
    /// The last `shipper started` line: its time, version and pid.
    pub started: Option<Started>,
    /// The executable `event=stale_binary` named since that start.
    pub stale: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Started {
    pub time: Option<SystemTime>,
    pub version: Option<String>,
    pub pid: Option<String>,
}

/// Reads the daemon's starts and stale-binary events in log order: a stale binary reported
/// before the last start was replaced by that start.
pub fn daemon_log(lines: &[LogLine]) -> DaemonLog {
    let mut d = DaemonLog::default();
    for l in lines {
        if field(&l.text, "event") == Some("stale_binary") {
            d.stale = Some(field(&l.text, "path").unwrap_or("?").to_string());
        } else if l.text.contains("shipper started") {
            d.started = Some(Started {
                time: l.time,
                version: field(&l.text, "version").map(str::to_string),
                pid: field(&l.text, "pid").map(str::to_string),
            });
            d.stale = None;
        }
    }
    d
}

/// What the daemon's own `/metrics` said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scrape {
    /// `[metrics] listen = ""`.
    Off,
    /// Port 0: the address is only in the daemon's start line, not worth guessing.
    Ephemeral,
    Unreachable {
        addr: String,
        why: String,
    },
    Answered {
        addr: String,
        stale: bool,
        version: Option<String>,
    },
}

/// Asks the daemon at `[metrics] listen` (a wildcard address is asked on loopback).
async fn scrape_daemon(cfg: &Config) -> Scrape {
    let Some(mut addr) = cfg.metrics.listen_addr() else {
        return Scrape::Off;
    };
    if addr.port() == 0 {
        return Scrape::Ephemeral;
    }
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr.ip() {
            std::net::IpAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::IpAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    match metrics::get(addr, "/metrics").await {
        Ok((200, text)) => read_scrape(addr.to_string(), &text),
        Ok((status, _)) => Scrape::Unreachable {
            addr: addr.to_string(),
            why: format!("/metrics answered {status}"),
        },
        Err(why) => Scrape::Unreachable {
            addr: addr.to_string(),
            why,
        },
    }
}

fn read_scrape(addr: String, text: &str) -> Scrape {
    let stale = text
        .lines()
        .filter_map(|l| l.strip_prefix(metrics::BINARY_STALE)?.strip_prefix(' '))
        .any(|v| v.trim() == "1");
    let version = text
        .lines()
        .find_map(|l| l.strip_prefix(metrics::BUILD_INFO)?.strip_prefix('{'))
        .and_then(|labels| labels.split("version=\"").nth(1))
        .and_then(|v| v.split('"').next())
        .map(str::to_string);
    Scrape::Answered {
        addr,
        stale,
        version,
    }
}

/// The daemon rows: a red one when its binary is stale (from the metrics or the log), and what
/// is known of the running version and its start.
pub fn daemon_rows(log: &DaemonLog, scrape: &Scrape) -> Vec<Row> {
    let mut rows = Vec::new();
    let own = env!("CARGO_PKG_VERSION");
    let stale_path = match (scrape, &log.stale) {
        (_, Some(path)) => Some(path.clone()),
        (Scrape::Answered { stale: true, .. }, None) => Some("its executable".to_string()),
        _ => None,
    };
    if let Some(path) = stale_path {
        rows.push(row(
            Level::Red,
            "daemon",
            format!("the running cis490-shipper's binary was replaced since it started ({path}): it runs old code until restarted"),
            Some(host::RESTART.to_string()),
        ));
    }
    let version = match (scrape, &log.started) {
        (
            Scrape::Answered {
                version: Some(v), ..
            },
            _,
        ) => Some(v.clone()),
        (_, Some(Started { version: v, .. })) => v.clone(),
        _ => None,
    };
    let mut said = Vec::new();
    if let Some(v) = &version {
        said.push(format!("version {v}"));
    }
    if let Some(s) = &log.started {
        if let Some(t) = s.time {
            said.push(format!("started {}", humantime::format_rfc3339_seconds(t)));
        }
        if let Some(p) = &s.pid {
            said.push(format!("pid {p}"));
        }
    }
    match scrape {
        Scrape::Answered { addr, .. } => said.push(format!("answering on {addr}")),
        Scrape::Unreachable { addr, why } => rows.push(row(
            Level::Yellow,
            "daemon",
            format!("no daemon answers on {addr} ([metrics] listen): {why}"),
            Some("systemctl status cis490-shipper".into()),
        )),
        Scrape::Off | Scrape::Ephemeral => {}
    }
    if let Some(v) = version.filter(|v| v != own) {
        rows.push(row(
            Level::Yellow,
            "daemon",
            format!("the running daemon is version {v}, the installed binary {own}"),
            Some(host::RESTART.to_string()),
        ));
    }
    if !said.is_empty() {
        rows.push(row(
            Level::Info,
            "daemon",
            format!("cis490-shipper {}", said.join(", ")),
            None,
        ));
    }
    rows
}

pub struct Options {
    pub since: Duration,
    pub since_text: String,
    pub log_file: Option<PathBuf>,
}

/// Runs every check; returns the rows (config problems become rows, not an early exit).
pub async fn run(cfg: Result<(Config, PathBuf), String>, opts: &Options) -> Vec<Row> {
    let mut rows = Vec::new();
    let mut fix_412 = host::DEFAULT_REMEDIATION.to_string();
    match &cfg {
        Err(e) => rows.push(row(
            Level::Red,
            "config",
            e.clone(),
            Some("fix the key named above in the config file".into()),
        )),
        Ok((cfg, path)) => {
            rows.push(row(
                Level::Green,
                "config",
                format!("{} is valid (host_id {})", path.display(), cfg.host_id),
                None,
            ));
            rows.extend(cert_rows(cfg));
            match host::transport(cfg, path) {
                Err(e) => rows.push(row(Level::Red, "receiver", e.to_string(), None)),
                Ok(t) => {
                    let root = &cfg.receiver.install_root;
                    let commit = host::installed_commit(root);
                    let urls = cfg.receiver.url.list();
                    let mut reachable = 0;
                    let mut down = Vec::new();
                    let mut commit_row = None;
                    for (i, url) in urls.iter().enumerate() {
                        let what = if urls.len() > 1 {
                            format!("receiver {url}")
                        } else {
                            "receiver".to_string()
                        };
                        match t.ping_at(i, commit.as_deref()).await {
                            Err(e) => down.push((what, format!("unreachable: {e}"), url.clone())),
                            Ok((200, Some(body))) => {
                                reachable += 1;
                                rows.push(row(
                                    Level::Green,
                                    &what,
                                    format!(
                                        "reachable; it sees this host as {} (gate source {}, {} commits)",
                                        body["host_id"].as_str().unwrap_or("?"),
                                        body["gate"]["source"].as_str().unwrap_or("none"),
                                        body["gate"]["commits"]
                                    ),
                                    None,
                                ));
                                if commit_row.is_some() {
                                    continue;
                                }
                                if let Some(r) = body["remediation"].as_str() {
                                    fix_412 = r.to_string();
                                }
                                commit_row = Some(match (&commit, body["commit_accepted"].as_bool()) {
                                    (None, _) => row(Level::Yellow, "commit", format!("{} (receiver.install_root) is not a git checkout; cannot tell which commit this host runs", root.display()), None),
                                    (Some(c), Some(true)) => row(Level::Green, "commit", format!("{c} (HEAD of {}) is admitted", root.display()), None),
                                    (Some(c), Some(false)) => row(Level::Red, "commit", format!("{c} (HEAD of {}) is NOT admitted: new episodes will be quarantined", root.display()), Some(fix_412.clone())),
                                    (Some(c), None) => row(Level::Yellow, "commit", format!("{c}: the receiver has no commit list yet"), None),
                                });
                            }
                            Ok((status, body)) => rows.push(row(
                                Level::Red,
                                &what,
                                format!(
                                    "refused ping with {status}: {}",
                                    body.as_ref()
                                        .and_then(|b| b["message"].as_str())
                                        .unwrap_or("")
                                ),
                                Some("check the certificate's host name and the token file".into()),
                            )),
                        }
                    }
                    // One receiver down while another answers: shipping continues (failover),
                    // but the redundancy is gone, so yellow; all down is red.
                    let level = if reachable > 0 {
                        Level::Yellow
                    } else {
                        Level::Red
                    };
                    for (what, msg, url) in down {
                        rows.push(row(
                            level,
                            &what,
                            msg,
                            Some(format!(
                                "check the network path to {url} and that cis490-receiver runs there"
                            )),
                        ));
                    }
                    rows.extend(commit_row);
                }
            }
            rows.extend(queue_rows(cfg));
        }
    }
    let since = SystemTime::now() - opts.since;
    let log = read_log(opts.log_file.as_deref(), since).map(|text| parse_log(&text));
    // A --log-file is read whole, so its daemon lines are all there; the journal is asked
    // again without --since, since the start line and a stale binary may be days old.
    let daemon_lines = match (&opts.log_file, &log) {
        (Some(_), Ok(lines)) => lines.clone(),
        (None, _) => read_daemon_journal()
            .map(|t| parse_log(&t))
            .or_else(|| log.as_ref().ok().cloned())
            .unwrap_or_default(),
        (Some(_), Err(_)) => Vec::new(),
    };
    if let Ok((cfg, _)) = &cfg {
        rows.extend(daemon_rows(
            &daemon_log(&daemon_lines),
            &scrape_daemon(cfg).await,
        ));
    } else {
        rows.extend(daemon_rows(&daemon_log(&daemon_lines), &Scrape::Off));
    }
    match log {
        Err(r) => rows.push(r),
        Ok(lines) => {
            let counts = classify(&lines, since);
            rows.extend(log_rows(&counts, &opts.since_text, &fix_412));
        }
    }
    rows
}

/// Days before expiry under which a certificate row is yellow, and red (SPEC §14).
const CERT_YELLOW_DAYS: u64 = 30;
const CERT_RED_DAYS: u64 = 7;

/// The row for a certificate of `what` expiring at `not_after` (SPEC §14's thresholds).
fn expiry_row(what: &str, not_after: SystemTime, now: SystemTime, renew: &str) -> Row {
    let days = not_after
        .duration_since(now)
        .ok()
        .map(|d| d.as_secs() / 86_400);
    match days {
        None => row(
            Level::Red,
            "certificate",
            format!("{what} has expired"),
            Some(renew.to_string()),
        ),
        Some(d) if d < CERT_RED_DAYS => row(
            Level::Red,
            "certificate",
            format!("{what} expires in {d} day(s)"),
            Some(renew.to_string()),
        ),
        Some(d) if d < CERT_YELLOW_DAYS => row(
            Level::Yellow,
            "certificate",
            format!("{what} expires in {d} day(s)"),
            Some(renew.to_string()),
        ),
        Some(d) => row(
            Level::Green,
            "certificate",
            format!("{what} valid for {d} more day(s)"),
            None,
        ),
    }
}

fn cert_rows(cfg: &Config) -> Vec<Row> {
    let mut rows = Vec::new();
    let now = SystemTime::now();
    let renew_client = format!(
        "on the receiver: cis490-receiver pki issue {} --dir <pki dir>; install the files here, then {}",
        cfg.host_id,
        host::RESTART
    );
    match cis490_common::tls::summarize(&cfg.receiver.cert_file) {
        Err(e) => rows.push(row(Level::Red, "certificate", e.to_string(), None)),
        Ok(s) => {
            let path = cfg.receiver.cert_file.display();
            rows.push(expiry_row(
                &path.to_string(),
                s.not_after,
                now,
                &renew_client,
            ));
            if s.not_before > now {
                rows.push(row(
                    Level::Red,
                    "certificate",
                    format!("{path} is not valid yet (check the clock)"),
                    None,
                ));
            }
            if s.identity.as_deref() != Some(cfg.host_id.as_str()) {
                rows.push(row(
                    Level::Red,
                    "certificate",
                    format!(
                        "certificate names {:?} but host_id is {:?}: every upload gets 403",
                        s.identity.unwrap_or_default(),
                        cfg.host_id
                    ),
                    Some("use this host's own certificate, or fix host_id".into()),
                ));
            }
        }
    }
    if let Err(e) = cis490_common::tls::load_roots(&cfg.receiver.ca_file) {
        rows.push(row(Level::Red, "certificate", format!("CA: {e}"), None));
    } else if let Ok(s) = cis490_common::tls::summarize(&cfg.receiver.ca_file) {
        rows.push(expiry_row(
            &format!("CA {}", cfg.receiver.ca_file.display()),
            s.not_after,
            now,
            "renew the lab CA and every certificate it signed (docs/operations.md, \"Certificates\")",
        ));
    }
    rows
}

fn queue_rows(cfg: &Config) -> Vec<Row> {
    let mut rows = Vec::new();
    let s = Queue::new(&cfg.data_dir).status(SystemTime::now());
    let oldest = s.episodes.oldest_age_s.unwrap_or(0);
    let level = if oldest > 6 * 3600 {
        Level::Yellow
    } else {
        Level::Green
    };
    rows.push(row(
        level,
        "queue",
        format!(
            "{} episode(s) waiting (oldest {}), {} in outbox, {} shipped kept",
            s.episodes.count,
            s.episodes
                .oldest_age_s
                .map_or("-".to_string(), |a| format!("{a}s")),
            s.outbox.count,
            s.shipped.count
        ),
        None,
    ));
    if s.quarantine.count > 0 {
        let by: Vec<String> = s
            .quarantine
            .by_reason
            .iter()
            .map(|(r, n)| format!("{r}: {n}"))
            .collect();
        rows.push(row(
            Level::Yellow,
            "quarantine",
            format!("{} episode(s) quarantined ({})", s.quarantine.count, by.join(", ")),
            Some(format!("see {}/quarantine/*/quarantine_reason.json; after fixing the cause: cis490-shipper requeue ID", cfg.data_dir.display())),
        ));
    } else {
        rows.push(row(Level::Green, "quarantine", "empty", None));
    }
    match nix::sys::statvfs::statvfs(&cfg.data_dir) {
        Ok(st) => {
            let free = st.blocks_available() * st.fragment_size();
            let total = (st.blocks() * st.fragment_size()).max(1);
            let pct = free as f64 * 100.0 / total as f64;
            let level = if free < (1 << 30) || pct < 2.0 {
                Level::Red
            } else if pct < 10.0 {
                Level::Yellow
            } else {
                Level::Green
            };
            rows.push(row(
                level,
                "disk",
                format!(
                    "{:.1} GiB free ({pct:.0}%) on {}",
                    free as f64 / (1u64 << 30) as f64,
                    cfg.data_dir.display()
                ),
                None,
            ));
        }
        Err(e) => rows.push(row(
            Level::Red,
            "disk",
            format!("{}: {e}", cfg.data_dir.display()),
            None,
        )),
    }
    rows
}

/// Prints the rows for a person (colour only on a terminal) or as JSON.
pub fn print(rows: &[Row], json: bool) {
    if json {
        let ok = !rows.iter().any(|r| r.level == Level::Red);
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({"ok": ok, "rows": rows}))
                .unwrap_or_default()
        );
        return;
    }
    let tty = std::io::stdout().is_terminal();
    for r in rows {
        let (tag, colour) = match r.level {
            Level::Red => ("FAIL", "\x1b[31m"),
            Level::Yellow => ("WARN", "\x1b[33m"),
            Level::Info => ("INFO", "\x1b[36m"),
            Level::Green => ("OK", "\x1b[32m"),
        };
        let tag = if tty {
            format!("{colour}{tag:<4}\x1b[0m")
        } else {
            format!("{tag:<4}")
        };
        println!("{tag}  {:<12} {}", r.check, r.detail);
        if let Some(fix) = &r.fix {
            for line in fix.lines() {
                println!("      {:<12} fix: {line}", "");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stale_binary_counts_only_after_the_last_start() {
        let log = "\
2026-12-01T10:00:00Z  INFO shipper started version=\"0.0.9\" pid=10 queued=0 metrics_listen=off
2026-12-01T11:00:00Z ERROR this daemon runs an old binary event=\"stale_binary\" path=/opt/cis490/bin/cis490-shipper why=\"x\"
2026-12-01T11:05:00Z  INFO shipper started version=\"{VERSION}\" pid=42 queued=3 metrics_listen=127.0.0.1:9491
";
        let log = &log.replace("{VERSION}", env!("CARGO_PKG_VERSION"));
        let d = daemon_log(&parse_log(log));
        assert_eq!(
            d.stale, None,
            "the restart cured the earlier run's stale binary"
        );
        let s = d.started.clone().unwrap();
        assert_eq!(
            (s.version.as_deref(), s.pid.as_deref()),
            (Some(env!("CARGO_PKG_VERSION")), Some("42"))
        );
        assert_eq!(
            s.time,
            Some(UNIX_EPOCH + Duration::from_secs(1_796_122_800 + 5 * 60))
        );
        let rows = daemon_rows(&d, &Scrape::Off);
        assert_eq!(rows.len(), 1, "{rows:?}");
        assert_eq!(rows[0].level, Level::Info);
        assert!(
            rows[0].detail.contains(&format!(
                "version {}, started 2026-12-01T11:05:00Z, pid 42",
                env!("CARGO_PKG_VERSION")
            )),
            "{rows:?}"
        );

        let later = format!("{log}2026-12-02T09:00:00Z ERROR old binary event=\"stale_binary\" path=/opt/cis490/bin/cis490-shipper why=\"x\"\n");
        let d = daemon_log(&parse_log(&later));
        assert_eq!(d.stale.as_deref(), Some("/opt/cis490/bin/cis490-shipper"));
        let rows = daemon_rows(&d, &Scrape::Ephemeral);
        assert_eq!(rows[0].level, Level::Red);
        assert_eq!(rows[0].fix.as_deref(), Some(host::RESTART));
        assert!(rows[0].detail.contains("/opt/cis490/bin/cis490-shipper"));
    }

    #[test]
    fn the_daemons_metrics_say_stale_and_which_version() {
        let text = "# TYPE cis490_shipper_binary_stale gauge\n\
cis490_shipper_binary_stale 1\n\
cis490_shipper_build_info{version=\"0.0.7\",host_commit=\"\"} 1\n";
        let scrape = read_scrape("127.0.0.1:9491".into(), text);
        assert_eq!(
            scrape,
            Scrape::Answered {
                addr: "127.0.0.1:9491".into(),
                stale: true,
                version: Some("0.0.7".into())
            }
        );
        let rows = daemon_rows(&DaemonLog::default(), &scrape);
        let levels: Vec<Level> = rows.iter().map(|r| r.level).collect();
        assert_eq!(levels, [Level::Red, Level::Yellow, Level::Info], "{rows:?}");
        assert!(rows[1].detail.contains(&format!(
            "version 0.0.7, the installed binary {}",
            env!("CARGO_PKG_VERSION")
        )));
        assert!(rows[2].detail.contains("answering on 127.0.0.1:9491"));
        let fresh = read_scrape("a".into(), "cis490_shipper_binary_stale 0\n");
        assert!(daemon_rows(&DaemonLog::default(), &fresh)
            .iter()
            .all(|r| r.level != Level::Red));
        let down = Scrape::Unreachable {
            addr: "127.0.0.1:9491".into(),
            why: "connection refused".into(),
        };
        assert_eq!(
            daemon_rows(&DaemonLog::default(), &down)[0].level,
            Level::Yellow
        );
    }

    #[test]
    fn certificate_rows_follow_spec_14() {
        let now = SystemTime::now();
        let level = |days_left: i64| {
            let at = if days_left >= 0 {
                now + Duration::from_secs(days_left as u64 * 86_400 + 3600)
            } else {
                now - Duration::from_secs(3600)
            };
            expiry_row("c.pem", at, now, "renew").level
        };
        assert_eq!(level(-1), Level::Red);
        assert_eq!(level(0), Level::Red);
        assert_eq!(level(6), Level::Red);
        assert_eq!(level(7), Level::Yellow);
        assert_eq!(level(29), Level::Yellow);
        assert_eq!(level(30), Level::Green);
    }

    #[test]
    fn journal_and_text_lines_are_classified() {
        let now = SystemTime::now();
        let us = now.duration_since(UNIX_EPOCH).unwrap().as_micros();
        let old = us - 3_600_000_000;
        let journal = format!(
            "{{\"__REALTIME_TIMESTAMP\":\"{us}\",\"MESSAGE\":\"ERROR this lab host's code is out of date event=\\\"ship_rejected\\\" episode=e1 status=412 reason=\\\"commit_not_in_window\\\"\"}}\n\
             {{\"__REALTIME_TIMESTAMP\":\"{old}\",\"MESSAGE\":\"ERROR old event=\\\"ship_rejected\\\" episode=e0 status=412\"}}\n\
             {{\"__REALTIME_TIMESTAMP\":\"{us}\",\"MESSAGE\":\"WARN transient event=\\\"ship_transient\\\" episode=e2\"}}\n\
             {{\"__REALTIME_TIMESTAMP\":\"{us}\",\"MESSAGE\":\"ERROR refused event=\\\"ship_rejected\\\" episode=e3 status=400 reason=\\\"malformed_request\\\"\"}}\n"
        );
        let c = classify(&parse_log(&journal), now - Duration::from_secs(600));
        assert_eq!(
            (c.out_of_window, c.malformed, c.transient, c.shipped),
            (1, 1, 1, 0)
        );
        let rows = log_rows(&c, "10min", "fix it");
        assert_eq!(rows[0].level, Level::Red);
        assert!(rows[0]
            .detail
            .starts_with("1 ship(s) rejected as out-of-window"));
        assert_eq!(rows[0].fix.as_deref(), Some("fix it"));
        assert!(rows[1].detail.contains("malformed"));
        assert_eq!(rows[2].level, Level::Yellow);

        // 400 only, transient only, local only, nothing at all.
        let only400 =
            "ERROR x event=\"ship_rejected\" episode=a status=400 reason=\"malformed_request\"\n";
        let rows = log_rows(&classify(&parse_log(only400), now), "10min", "");
        assert_eq!((rows.len(), rows[0].level), (1, Level::Red));
        assert!(rows[0].detail.contains("malformed (400)"));
        let transient = "WARN x event=\"ship_transient\" episode=a detail=refused\nWARN x event=\"ship_transient\" episode=b\n";
        let rows = log_rows(&classify(&parse_log(transient), now), "10min", "");
        assert_eq!((rows.len(), rows[0].level), (1, Level::Yellow));
        assert!(rows[0].detail.starts_with("2 transient error(s)"));
        let local = "ERROR x event=\"ship_rejected\" episode=a reason=\"unstamped\"\n";
        let rows = log_rows(&classify(&parse_log(local), now), "10min", "");
        assert_eq!(rows[0].level, Level::Yellow);
        assert!(rows[0].detail.contains("set aside on this host"));
        let rows = log_rows(&classify(&parse_log(""), now), "10min", "");
        assert_eq!((rows.len(), rows[0].level), (1, Level::Info));
        assert!(rows[0].detail.starts_with("no shipping activity"));

        let text = "2026-11-23T15:39:58.995046Z  INFO episode shipped event=\"shipped\" episode=ep-020 status=201\n";
        let c = classify(&parse_log(text), UNIX_EPOCH);
        assert_eq!(c.shipped, 1);
        let rows = log_rows(&c, "10min", "");
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].level, Level::Green);
        let c = classify(&parse_log(text), now);
        assert_eq!(c.shipped, 0, "--since drops lines with an older time");
        assert_eq!(log_rows(&c, "10min", "")[0].level, Level::Info);
    }
}
