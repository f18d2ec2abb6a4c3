//! Command line of `cis490-shipper` (SPEC §7) and the exit codes it maps outcomes to.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use cis490_common::cli::{CliError, ConfigFlag, EXIT_CONFIG, EXIT_FAILURE};
use cis490_common::{notify, Reason};

use crate::config::{self, Config, ConfigError};
use crate::daemon::Shipper;
use crate::host;
use crate::metrics::Textfile;
use crate::queue::{newest_mtime, read_stamp, QuarantineReason, Queue, Stamp};
use crate::transport::Transport;

/// The program name every error line starts with.
const PROGRAM: &str = "cis490-shipper";
/// `ping`: the receiver refuses the commit.
const EXIT_NOT_ADMITTED: u8 = 4;

#[derive(Debug, Parser)]
#[command(
    name = "cis490-shipper",
    version = cis490_common::LONG_VERSION,
    about = "Ships finished lab episodes to the cis490 receiver over mutual TLS"
)]
pub struct Cli {
    #[command(flatten)]
    pub config: ConfigFlag,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Run the daemon (the default).
    Run,
    /// Ship every ready episode once, then exit (1 if some are still queued).
    Once,
    /// Ask the receiver who we are and whether a commit would be admitted.
    Ping {
        /// Commit to ask about (default: HEAD of `[receiver] install_root`, /opt/cis490).
        #[arg(long)]
        commit: Option<String>,
    },
    /// Counts and oldest ages of episodes, outbox, shipped and quarantine.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Quarantine episodes whose meta.json lacks a usable commit (reason `unstamped`).
    QuarantineUnstamped {
        #[arg(long)]
        dry_run: bool,
    },
    /// Check config, certificates, receiver, commit, queue and disk; classify recent log lines.
    Doctor {
        /// How far back to read the log (e.g. 10min, 2h).
        #[arg(long, default_value = "10min")]
        since: String,
        /// Read this file (journalctl JSON lines or the shipper's own log) instead of the journal.
        #[arg(long, value_name = "F")]
        log_file: Option<PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Move quarantined episodes back to episodes/.
    Requeue {
        #[arg(required = true)]
        ids: Vec<String>,
    },
}

/// `--ping` and `--once` are accepted as spellings of the commands.
fn normalise_args(args: impl IntoIterator<Item = std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    args.into_iter()
        .map(|a| match a.to_str() {
            Some("--ping") => "ping".into(),
            Some("--once") => "once".into(),
            _ => a,
        })
        .collect()
}

fn load(cli: &Cli) -> Result<(Config, PathBuf), ConfigError> {
    let path = cli.config.resolve(config::ENV_PATH, config::DEFAULT_PATH);
    Ok((Config::load(&path)?, path))
}

pub fn main() -> ExitCode {
    cis490_common::memory::limit_malloc_arenas();
    let cli = Cli::parse_from(normalise_args(std::env::args_os()));
    cis490_common::logging::init();
    cis490_common::cli::exit(PROGRAM, dispatch(&cli))
}

/// Runs the command `cli` names.
fn dispatch(cli: &Cli) -> Result<(), CliError> {
    let command = cli.command.clone().unwrap_or(Command::Run);
    // doctor reports a config error as one of its rows; every other command needs the config.
    if let Command::Doctor {
        since,
        log_file,
        json,
    } = command
    {
        return doctor(cli, &since, log_file, json);
    }
    let (cfg, path) = load(cli)?;
    let queue = Queue::new(&cfg.data_dir);
    match command {
        Command::Run => ship(cfg, &path, &queue, false),
        Command::Once => ship(cfg, &path, &queue, true),
        Command::Ping { commit } => {
            let rt = runtime()?;
            let t = host::transport(&cfg, &path)?;
            rt.block_on(ping(&cfg, &t, commit))
        }
        Command::Status { json } => status(&queue, json),
        Command::QuarantineUnstamped { dry_run } => quarantine_unstamped(&cfg, &queue, dry_run),
        Command::Requeue { ids } => requeue(&queue, &ids),
        Command::Doctor { .. } => unreachable!("invariant: doctor returned above"),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, CliError> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::failure(format_args!("failed to start the runtime: {e}")))
}

/// `run` and `once`: everything is checked before the first episode is touched, and `run`'s
/// metrics listener is bound before READY=1.
fn ship(cfg: Config, path: &Path, queue: &Queue, once: bool) -> Result<(), CliError> {
    let rt = runtime()?;
    let t = host::transport(&cfg, path)?;
    let data_dir = |e: String| ConfigError::new(path, "data_dir", e);
    queue.prepare().map_err(|e| data_dir(e.to_string()))?;
    // One shipping process per data_dir for its whole life: two would pack the same .partial
    // and sweep each other's work.
    let _daemon_lock = cis490_common::lock::try_exclusive_named(&cfg.data_dir, ".daemon.lock")
        .map_err(|e| data_dir(e.to_string()))?
        .ok_or_else(|| {
            data_dir(format!(
                "{} is in use by another cis490-shipper (run or once); stop it first",
                cfg.data_dir.display()
            ))
        })?;
    let textfile = cfg
        .metrics
        .textfile()
        .map(Textfile::open)
        .transpose()
        .map_err(|e| ConfigError::new(path, "metrics.textfile", e))?;
    // `once` serves nothing: a scrape would only ever catch it by luck.
    let ops = match cfg.metrics.listen_addr().filter(|_| !once) {
        None => None,
        Some(addr) => Some(
            rt.block_on(tokio::net::TcpListener::bind(addr))
                .map_err(|e| {
                    ConfigError::new(
                        path,
                        "metrics.listen",
                        format!("failed to listen on {addr}: {e}"),
                    )
                })?,
        ),
    };
    let shipped = rt.block_on(run(Arc::new(Shipper::new(cfg, t, textfile)), once, ops));
    // A pack still running on a blocking thread must not hold up the exit: its .partial file
    // is swept on the next start.
    rt.shutdown_timeout(Duration::from_secs(1));
    shipped
}

fn doctor(cli: &Cli, since: &str, log_file: Option<PathBuf>, json: bool) -> Result<(), CliError> {
    let since_d = humantime::parse_duration(since).map_err(|e| {
        CliError::new(
            EXIT_CONFIG,
            format_args!("--since {since:?}: {e} (examples: 10min, 2h, 30s)"),
        )
    })?;
    let cfg = load(cli).map_err(|e| e.to_string());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::failure(format_args!("failed to start the runtime: {e}")))?;
    let opts = crate::doctor::Options {
        since: since_d,
        since_text: since.to_string(),
        log_file,
    };
    let rows = rt.block_on(crate::doctor::run(cfg, &opts));
    crate::doctor::print(&rows, json);
    if rows.iter().any(|r| r.level == crate::doctor::Level::Red) {
        return Err(CliError::reported(EXIT_FAILURE));
    }
    Ok(())
}

async fn run(
    shipper: Arc<Shipper>,
    once: bool,
    ops: Option<tokio::net::TcpListener>,
) -> Result<(), CliError> {
    let shutdown = CancellationToken::new();
    spawn_signals(shutdown.clone())
        .map_err(|e| CliError::failure(format_args!("failed to install signal handlers: {e}")))?;
    if once {
        return match shipper.once(shutdown).await {
            Ok(true) => Ok(()),
            // Each episode kept has been logged.
            Ok(false) => Err(CliError::reported(EXIT_FAILURE)),
            Err(e) => Err(CliError::failure(format_args!("{e:#}"))),
        };
    }
    match shipper.run(shutdown, notify::ready, ops).await {
        Ok(()) => {
            tracing::info!("shipper stopped");
            Ok(())
        }
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "shipper failed");
            Err(CliError::reported(EXIT_FAILURE))
        }
    }
}

fn spawn_signals(shutdown: CancellationToken) -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("stop requested");
        notify::stopping();
        shutdown.cancel();
    });
    Ok(())
}

async fn ping(cfg: &Config, t: &Transport, commit: Option<String>) -> Result<(), CliError> {
    let commit = commit.or_else(|| host::installed_commit(&cfg.receiver.install_root));
    let eps = t.endpoints();
    println!("host_id:    {} (from the config)", cfg.host_id);
    // Every receiver of the list is asked: a fleet that fails over must be able to reach each.
    let (mut ok, mut failed, mut not_admitted) = (0, 0, 0);
    for i in 0..eps.len() {
        if eps.len() > 1 {
            println!();
        }
        match ping_one(cfg, t, i, commit.as_deref()).await {
            PingResult::Ok => ok += 1,
            PingResult::Failed => failed += 1,
            PingResult::NotAdmitted => not_admitted += 1,
        }
    }
    if eps.len() > 1 {
        println!();
        println!("summary:    {ok} of {} receivers OK", eps.len());
    }
    if failed > 0 {
        Err(CliError::reported(EXIT_FAILURE))
    } else if not_admitted > 0 {
        Err(CliError::reported(EXIT_NOT_ADMITTED))
    } else {
        Ok(())
    }
}

enum PingResult {
    Ok,
    Failed,
    NotAdmitted,
}

async fn ping_one(cfg: &Config, t: &Transport, i: usize, commit: Option<&str>) -> PingResult {
    let urls = cfg.receiver.url.list();
    println!(
        "receiver:   {}",
        urls.get(i).map(String::as_str).unwrap_or("?")
    );
    let (status, body) = match t.ping_at(i, commit).await {
        Ok(x) => x,
        Err(e) => {
            println!("result:     UNREACHABLE: {e}");
            return PingResult::Failed;
        }
    };
    let body = body.unwrap_or_default();
    if status != 200 {
        println!(
            "result:     REFUSED ({status} {}): {}",
            body["error"].as_str().unwrap_or("?"),
            body["message"].as_str().unwrap_or("")
        );
        return PingResult::Failed;
    }
    println!(
        "identity:   {} (as the receiver sees this host)",
        body["host_id"].as_str().unwrap_or("?")
    );
    println!(
        "version:    receiver {}",
        body["receiver_version"].as_str().unwrap_or("?")
    );
    let g = &body["gate"];
    println!(
        "gate:       enabled={} source={} head={} commits={} window={} age_s={}{}",
        g["enabled"],
        g["source"].as_str().unwrap_or("none"),
        g["head_commit"].as_str().unwrap_or("-"),
        g["commits"],
        g["window"],
        g["age_s"],
        g["last_error"]
            .as_str()
            .map(|e| format!(" last_error={e}"))
            .unwrap_or_default()
    );
    if body["host_id"].as_str() != Some(cfg.host_id.as_str()) {
        println!(
            "result:     MISMATCH: the certificate names {:?} but host_id is {:?}: every upload will be refused (403)",
            body["host_id"].as_str().unwrap_or(""),
            cfg.host_id
        );
        return PingResult::Failed;
    }
    match (commit, body["commit_accepted"].as_bool()) {
        (None, _) => {
            println!(
                "commit:     (none given and {} is not a git checkout)",
                cfg.receiver.install_root.display()
            );
            PingResult::Ok
        }
        (Some(c), Some(true)) => {
            println!("commit:     {c} ADMITTED");
            PingResult::Ok
        }
        (Some(c), Some(false)) => {
            println!("commit:     {c} NOT ADMITTED; to fix, run on this host:");
            for line in body["remediation"].as_str().unwrap_or("").lines() {
                println!("    {line}");
            }
            PingResult::NotAdmitted
        }
        (Some(c), None) => {
            println!(
                "commit:     {c} unknown: the receiver has no commit list yet (retry shortly)"
            );
            PingResult::Failed
        }
    }
}

fn status(queue: &Queue, json: bool) -> Result<(), CliError> {
    let s = queue.status(SystemTime::now());
    if json {
        println!("{}", serde_json::to_string_pretty(&s).unwrap_or_default());
        return Ok(());
    }
    let age = |a: Option<u64>| a.map_or_else(|| "-".to_string(), |s| format!("{s}s"));
    println!("{:<11} {:>8}  oldest", "", "count");
    println!(
        "{:<11} {:>8}  {}",
        "episodes",
        s.episodes.count,
        age(s.episodes.oldest_age_s)
    );
    println!(
        "{:<11} {:>8}  {}",
        "outbox",
        s.outbox.count,
        age(s.outbox.oldest_age_s)
    );
    println!(
        "{:<11} {:>8}  {}",
        "shipped",
        s.shipped.count,
        age(s.shipped.oldest_age_s)
    );
    println!(
        "{:<11} {:>8}  {}",
        "quarantine",
        s.quarantine.count,
        age(s.quarantine.oldest_age_s)
    );
    for (r, n) in &s.quarantine.by_reason {
        println!("  {r:<26} {n}");
    }
    Ok(())
}

fn quarantine_unstamped(cfg: &Config, queue: &Queue, dry_run: bool) -> Result<(), CliError> {
    let list = queue
        .list()
        .map_err(|e| CliError::failure(format_args!("failed to list episodes: {e}")))?;
    let settle = Duration::from_secs(cfg.shipping.settle_s);
    let now = SystemTime::now();
    let (mut kept, mut moved, mut settling) = (0, 0, 0);
    for c in list {
        // An episode still being written may not have its meta.json yet: leave it alone.
        let quiet = newest_mtime(&c.dir)
            .map(|t| now.duration_since(t).unwrap_or_default() >= settle)
            .unwrap_or(false);
        if !quiet {
            settling += 1;
            continue;
        }
        let why = match read_stamp(&c.dir) {
            Stamp::Commit(_) => {
                kept += 1;
                continue;
            }
            Stamp::Missing => "meta.json is missing".to_string(),
            Stamp::Bad(w) => w,
        };
        if dry_run {
            println!("would quarantine {}: {why}", c.id);
            moved += 1;
            continue;
        }
        let r = QuarantineReason::new(&c.id, Reason::Unstamped, None, None, None);
        match queue.quarantine(&c.id, &r) {
            Ok(dest) => {
                tracing::warn!(event = "quarantined", episode = %c.id, reason = Reason::Unstamped.as_str(), detail = %why, "episode quarantined");
                println!("quarantined {} → {}: {why}", c.id, dest.display());
                moved += 1;
            }
            // The daemon moved it first (it quarantines unstamped episodes too): nothing to do.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => eprintln!("failed to quarantine {}: {e}", c.id),
        }
    }
    let verb = if dry_run {
        "would quarantine"
    } else {
        "quarantined"
    };
    println!("kept {kept}, {verb} {moved}, still settling {settling}");
    Ok(())
}

fn requeue(queue: &Queue, ids: &[String]) -> Result<(), CliError> {
    let mut failed = false;
    for id in ids {
        match queue.requeue(id) {
            Ok(dest) => println!("requeued {id} → {}", dest.display()),
            // Said as it happens, so every unknown ID is named and the rest still move.
            Err(e) => {
                eprintln!("{PROGRAM}: {e}");
                failed = true;
            }
        }
    }
    if failed {
        return Err(CliError::reported(EXIT_FAILURE));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_become_commands() {
        let a = normalise_args(["x", "--once", "--config", "c"].map(std::ffi::OsString::from));
        assert_eq!(a[1], "once");
        let a = normalise_args(["x", "--ping"].map(std::ffi::OsString::from));
        assert_eq!(a[1], "ping");
    }
}
