//! Command line of `cis490-shipper` (SPEC §7) and the exit codes it maps outcomes to.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use cis490_common::{notify, Reason};

use crate::config::{self, Config, ConfigError};
use crate::daemon::Shipper;
use crate::queue::{newest_mtime, read_stamp, QuarantineReason, Queue, Stamp};
use crate::transport::{Settings, Transport};

pub const EXIT_FAILURE: u8 = 1;
pub const EXIT_CONFIG: u8 = 2;
pub const EXIT_NOT_ADMITTED: u8 = 4;
/// Where the lab's code is installed; `ping` asks about its HEAD by default.
pub const INSTALL_ROOT: &str = "/opt/cis490";
/// What a lab host runs when its code is out of date (the receiver's default remediation).
pub const DEFAULT_REMEDIATION: &str = "cd /opt/cis490 && sudo -u cis490 git pull origin main\nsudo /opt/cis490/scripts/install-lab-host.sh";

#[derive(Debug, Parser)]
#[command(
    name = "cis490-shipper",
    version,
    about = "Ships finished lab episodes to the cis490 receiver over mutual TLS"
)]
pub struct Cli {
    /// Config file (default: $CIS490_SHIPPER_CONFIG, else /etc/cis490/lab-host.toml).
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
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
        /// Commit to ask about (default: HEAD of /opt/cis490).
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

fn config_fail(e: &ConfigError) -> ExitCode {
    eprintln!("cis490-shipper: config error: {e}");
    ExitCode::from(EXIT_CONFIG)
}

fn load(cli: &Cli) -> Result<(Config, PathBuf), ConfigError> {
    let path = config::resolve_path(cli.config.clone(), std::env::var_os(config::ENV_PATH));
    Ok((Config::load(&path)?, path))
}

/// Builds the transport; certificate and token problems are config errors naming the key.
pub fn transport(cfg: &Config, path: &Path) -> Result<Transport, ConfigError> {
    let r = &cfg.receiver;
    let tls = crate::transport::client_tls(&r.ca_file, &r.cert_file, &r.key_file).map_err(|e| {
        let key = e.config_key(&cis490_common::tls::TlsKeys {
            cert: (&r.cert_file, "receiver.cert_file"),
            key: (&r.key_file, "receiver.key_file"),
            ca: (&r.ca_file, "receiver.ca_file"),
            crl: None,
            pair: "receiver.cert_file",
        });
        ConfigError::new(path, key, e.to_string())
    })?;
    let token = cfg.token(path)?;
    Transport::new(Settings {
        urls: r.url.list(),
        tls,
        token,
        connect_timeout: Duration::from_secs(r.connect_timeout_s),
        idle_timeout: Duration::from_secs(r.idle_timeout_s),
        bandwidth_limit_mbps: cfg.shipping.bandwidth_limit_mbps,
    })
    .map_err(|e| ConfigError::new(path, "receiver.url", e))
}

pub fn main() -> ExitCode {
    cis490_common::memory::limit_malloc_arenas();
    let cli = Cli::parse_from(normalise_args(std::env::args_os()));
    cis490_common::logging::init();
    if let Some(Command::Doctor {
        since,
        log_file,
        json,
    }) = &cli.command
    {
        return doctor(&cli, since, log_file.clone(), *json);
    }
    let (cfg, path) = match load(&cli) {
        Ok(x) => x,
        Err(e) => return config_fail(&e),
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cis490-shipper: failed to start the runtime: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let queue = Queue::new(&cfg.data_dir);
    match cli.command.clone().unwrap_or(Command::Run) {
        Command::Run | Command::Once => {
            let once = matches!(cli.command, Some(Command::Once));
            let t = match transport(&cfg, &path) {
                Ok(t) => t,
                Err(e) => return config_fail(&e),
            };
            if let Err(e) = queue.prepare() {
                return config_fail(&ConfigError::new(&path, "data_dir", e.to_string()));
            }
            // One shipping process per data_dir for its whole life: two would pack the same
            // .partial and sweep each other's work.
            let _daemon_lock =
                match cis490_common::lock::try_exclusive_named(&cfg.data_dir, ".daemon.lock") {
                    Ok(Some(l)) => l,
                    Ok(None) => {
                        return config_fail(&ConfigError::new(
                            &path,
                            "data_dir",
                            format!(
                            "{} is in use by another cis490-shipper (run or once); stop it first",
                            cfg.data_dir.display()
                        ),
                        ));
                    }
                    Err(e) => {
                        return config_fail(&ConfigError::new(&path, "data_dir", e.to_string()))
                    }
                };
            let code = rt.block_on(run(Arc::new(Shipper::new(cfg, t)), once));
            // A pack still running on a blocking thread must not hold up the exit: its
            // .partial file is swept on the next start.
            rt.shutdown_timeout(Duration::from_secs(1));
            code
        }
        Command::Ping { commit } => {
            let t = match transport(&cfg, &path) {
                Ok(t) => t,
                Err(e) => return config_fail(&e),
            };
            rt.block_on(ping(&cfg, &t, commit))
        }
        Command::Status { json } => status(&queue, json),
        Command::QuarantineUnstamped { dry_run } => quarantine_unstamped(&cfg, &queue, dry_run),
        Command::Requeue { ids } => requeue(&queue, &ids),
        Command::Doctor { .. } => ExitCode::from(EXIT_CONFIG),
    }
}

fn doctor(cli: &Cli, since: &str, log_file: Option<PathBuf>, json: bool) -> ExitCode {
    let since_d = match humantime::parse_duration(since) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("cis490-shipper: --since {since:?}: {e} (examples: 10min, 2h, 30s)");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let cfg = load(cli).map_err(|e| e.to_string());
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cis490-shipper: failed to start the runtime: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let opts = crate::doctor::Options {
        since: since_d,
        since_text: since.to_string(),
        log_file,
        json,
    };
    let rows = rt.block_on(crate::doctor::run(cfg, &opts));
    crate::doctor::print(&rows, json);
    if rows.iter().any(|r| r.level == crate::doctor::Level::Red) {
        ExitCode::from(EXIT_FAILURE)
    } else {
        ExitCode::SUCCESS
    }
}

async fn run(shipper: Arc<Shipper>, once: bool) -> ExitCode {
    let shutdown = CancellationToken::new();
    if let Err(e) = spawn_signals(shutdown.clone()) {
        eprintln!("cis490-shipper: failed to install signal handlers: {e}");
        return ExitCode::from(EXIT_FAILURE);
    }
    if once {
        return match shipper.once(shutdown).await {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::from(EXIT_FAILURE),
            Err(e) => {
                eprintln!("cis490-shipper: {e:#}");
                ExitCode::from(EXIT_FAILURE)
            }
        };
    }
    match shipper.run(shutdown, notify::ready).await {
        Ok(()) => {
            tracing::info!("shipper stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "shipper failed");
            ExitCode::from(EXIT_FAILURE)
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

/// HEAD of the install root, if it is a git checkout.
pub fn installed_commit(root: &Path) -> Option<String> {
    let repo = gix::open_opts(root, gix::open::Options::isolated()).ok()?;
    repo.head_id().ok().map(|id| id.to_string())
}

async fn ping(cfg: &Config, t: &Transport, commit: Option<String>) -> ExitCode {
    let commit = commit.or_else(|| installed_commit(Path::new(INSTALL_ROOT)));
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
        ExitCode::from(EXIT_FAILURE)
    } else if not_admitted > 0 {
        ExitCode::from(EXIT_NOT_ADMITTED)
    } else {
        ExitCode::SUCCESS
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
            println!("commit:     (none given and {INSTALL_ROOT} is not a git checkout)");
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

fn status(queue: &Queue, json: bool) -> ExitCode {
    let s = queue.status(SystemTime::now());
    if json {
        println!("{}", serde_json::to_string_pretty(&s).unwrap_or_default());
        return ExitCode::SUCCESS;
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
    ExitCode::SUCCESS
}

fn quarantine_unstamped(cfg: &Config, queue: &Queue, dry_run: bool) -> ExitCode {
    let list = match queue.list() {
        Ok(l) => l,
        Err(e) => {
            eprintln!("cis490-shipper: failed to list episodes: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
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
    ExitCode::SUCCESS
}

fn requeue(queue: &Queue, ids: &[String]) -> ExitCode {
    let mut failed = false;
    for id in ids {
        match queue.requeue(id) {
            Ok(dest) => println!("requeued {id} → {}", dest.display()),
            Err(e) => {
                eprintln!("cis490-shipper: {e}");
                failed = true;
            }
        }
    }
    if failed {
        ExitCode::from(EXIT_FAILURE)
    } else {
        ExitCode::SUCCESS
    }
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
