//! Command line of `cis490-receiver` (SPEC §7) and the exit codes it maps errors to.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use cis490_common::notify;

use crate::config::{self, Config, ConfigError, StoreKind};
use crate::gate::Gate;
use crate::server::{open_s3, Receiver};
use crate::store;

pub const EXIT_FAILURE: u8 = 1;
pub const EXIT_CONFIG: u8 = 2;

#[derive(Debug, Parser)]
#[command(
    name = "cis490-receiver",
    version,
    about = "Admits lab episodes from current code over mutual TLS and stores them durably"
)]
pub struct Cli {
    /// Config file (default: $CIS490_RECEIVER_CONFIG, else /etc/cis490/receiver.toml).
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Run the daemon (the default).
    Serve,
    /// Rebuild index.jsonl from the stored tarballs.
    Reindex,
    /// Write every index row to stdout as JSON lines.
    ExportIndex,
    /// Validate the config, certificates and store, then exit.
    CheckConfig,
    /// Load the commit allow-list once and print what the gate sees.
    Gate,
    /// The lab's certificates (SPEC §14, §16); needs no receiver config.
    #[command(subcommand)]
    Pki(PkiCommand),
}

#[derive(Debug, Clone, Subcommand)]
pub enum PkiCommand {
    /// Revoke HOST_ID's current certificate into DIR/crl.pem (point [tls] crl_file at it,
    /// then reload the receiver with SIGHUP).
    Revoke {
        host_id: String,
        /// The lab PKI directory (ca.pem, ca.key, hosts/<HOST_ID>/<HOST_ID>.pem).
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
    },
}

fn pki(cmd: &PkiCommand) -> ExitCode {
    match cmd {
        PkiCommand::Revoke { host_id, dir } => match crate::pki::revoke(dir, host_id) {
            Ok(r) => {
                if r.newly {
                    println!("revoked {host_id}: certificate serial {}", r.serial);
                } else {
                    println!(
                        "{host_id}: certificate serial {} was revoked already",
                        r.serial
                    );
                }
                println!(
                    "{} now lists {} revoked certificate(s). With [tls] crl_file = \"{}\" in receiver.toml, apply it with:",
                    r.crl.display(),
                    r.total,
                    r.crl.display()
                );
                println!("  sudo systemctl reload cis490-receiver");
                ExitCode::SUCCESS
            }
            Err(e @ crate::pki::PkiError::BadHostId(..)) => {
                eprintln!("cis490-receiver: pki revoke: {e}");
                ExitCode::from(EXIT_CONFIG)
            }
            Err(e) => {
                eprintln!("cis490-receiver: pki revoke: {e}");
                ExitCode::from(EXIT_FAILURE)
            }
        },
    }
}

fn config_fail(e: &ConfigError) -> ExitCode {
    eprintln!("cis490-receiver: config error: {e}");
    ExitCode::from(EXIT_CONFIG)
}

fn load(cli: &Cli) -> Result<(Config, PathBuf), ConfigError> {
    let path = config::resolve_path(cli.config.clone(), std::env::var_os(config::ENV_PATH));
    let cfg = Config::load(&path)?;
    cfg.validate(&path)?;
    Ok((cfg, path))
}

pub fn main() -> ExitCode {
    cis490_common::memory::limit_malloc_arenas();
    let cli = Cli::parse();
    cis490_common::logging::init();
    if let Some(Command::Pki(cmd)) = &cli.command {
        return pki(cmd);
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
            eprintln!("cis490-receiver: failed to start the runtime: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => {
            let code = rt.block_on(serve(cfg, path));
            // Validators still blocked on a disk must not hold up the exit; their temp files
            // are removed on the next start.
            rt.shutdown_timeout(std::time::Duration::from_secs(1));
            code
        }
        Command::CheckConfig => match Receiver::check(&cfg, &path) {
            Ok(_) => {
                println!("{}: ok", path.display());
                ExitCode::SUCCESS
            }
            Err(e) => config_fail(&e),
        },
        Command::Reindex if cfg.store.kind == StoreKind::S3 => {
            let s3 = match cfg.validate(&path).and_then(|()| open_s3(&cfg, &path)) {
                Ok(s) => s,
                Err(e) => return config_fail(&e),
            };
            match rt.block_on(s3.reindex()) {
                Ok((ok, bad)) => {
                    println!("reindexed {ok} episode(s); {bad} object(s) skipped");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!(
                        "cis490-receiver: failed to reindex {}: {e:#}",
                        s3.describe()
                    );
                    ExitCode::from(EXIT_FAILURE)
                }
            }
        }
        Command::ExportIndex if cfg.store.kind == StoreKind::S3 => {
            let s3 = match cfg.validate(&path).and_then(|()| open_s3(&cfg, &path)) {
                Ok(s) => s,
                Err(e) => return config_fail(&e),
            };
            match rt.block_on(s3.export_index(&mut std::io::stdout().lock())) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("cis490-receiver: failed to export the index: {e:#}");
                    ExitCode::from(EXIT_FAILURE)
                }
            }
        }
        Command::Reindex => {
            match store::reindex(&cfg.store_dir, cfg.limits.max_uncompressed_bytes) {
                Ok((ok, bad)) => {
                    println!("reindexed {ok} episode(s); {bad} file(s) skipped");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!(
                        "cis490-receiver: failed to reindex {}: {e:#}",
                        cfg.store_dir.display()
                    );
                    ExitCode::from(EXIT_FAILURE)
                }
            }
        }
        Command::ExportIndex => {
            match store::export_index(&cfg.store_dir, &mut std::io::stdout().lock()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("cis490-receiver: failed to export the index: {e:#}");
                    ExitCode::from(EXIT_FAILURE)
                }
            }
        }
        Command::Gate => rt.block_on(gate_once(cfg, &path)),
        Command::Pki(cmd) => pki(&cmd),
    }
}

async fn gate_once(cfg: Config, path: &std::path::Path) -> ExitCode {
    let gate = match Gate::new(cfg.version_gate.clone()) {
        Ok(g) => g,
        Err((key, msg)) => return config_fail(&ConfigError::new(path, key, msg)),
    };
    let refreshed = if gate.enabled() {
        gate.refresh().await
    } else {
        Ok(())
    };
    let v = gate.view();
    println!("enabled:    {}", v.enabled);
    println!("source:     {}", v.source.unwrap_or("none"));
    println!("branch:     {}", cfg.version_gate.branch);
    println!("head:       {}", v.head_commit.as_deref().unwrap_or("-"));
    println!("commits:    {} (window {})", v.commits, v.window);
    println!(
        "age:        {}",
        v.age_s
            .map(|a| format!("{a}s"))
            .unwrap_or_else(|| "-".into())
    );
    println!("last_error: {}", v.last_error.as_deref().unwrap_or("-"));
    match refreshed {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) => ExitCode::from(EXIT_FAILURE),
    }
}

/// Lifts the soft open-file limit to the hard one: `max_connections` sockets plus the store's
/// files must fit (a 1024 soft limit would run out before the connection cap does).
fn raise_nofile_limit(want: u64) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    if soft < hard {
        if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            tracing::warn!(error = %e, "could not raise the open-file limit");
        }
    }
    let now = hard.max(soft);
    if now < want {
        tracing::warn!(
            limit = now,
            wanted = want,
            "the open-file limit is below limits.max_connections plus headroom; raise LimitNOFILE"
        );
    }
}

async fn serve(cfg: Config, path: PathBuf) -> ExitCode {
    raise_nofile_limit(cfg.limits.max_connections as u64 + 256);
    let (listen, metrics_listen) = (cfg.listen, cfg.metrics_listen);
    let receiver = match Receiver::new(cfg, &path) {
        Ok(r) => r,
        Err(e) => return config_fail(&e),
    };
    // Installed before anything announces the receiver as up: a SIGTERM that follows the
    // "receiver listening" line (or READY=1) is always a clean, drained stop, never the
    // default action's abrupt exit.
    let shutdown = CancellationToken::new();
    if let Err(e) = spawn_signals(receiver.clone(), shutdown.clone()) {
        eprintln!("cis490-receiver: failed to install signal handlers: {e}");
        return ExitCode::from(EXIT_FAILURE);
    }
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "cis490-receiver: failed to listen on {listen} (listen in {}): {e}",
                path.display()
            );
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let ops = match tokio::net::TcpListener::bind(metrics_listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "cis490-receiver: failed to listen on {metrics_listen} (metrics_listen in {}): {e}",
                path.display()
            );
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    tracing::info!(
        listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        metrics_listen = %ops.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        version = env!("CARGO_PKG_VERSION"),
        "receiver listening"
    );
    // A stop requested while starting up is not followed by READY=1 (systemd has STOPPING=1).
    if !shutdown.is_cancelled() {
        notify::ready();
    }
    let result = receiver.serve(listener, Some(ops), shutdown).await;
    match result {
        Ok(()) => {
            tracing::info!("receiver stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "receiver failed");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

fn spawn_signals(receiver: Receiver, shutdown: CancellationToken) -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let receiver = Arc::new(receiver);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = hup.recv() => {
                    notify::reloading();
                    match receiver.reload() {
                        Ok(()) => tracing::info!("reloaded certificates and tokens"),
                        Err(e) => tracing::error!(error = %e, "reload failed; keeping the previous certificates and tokens"),
                    }
                    notify::ready();
                }
            }
        }
        tracing::info!("stop requested");
        notify::stopping();
        shutdown.cancel();
    });
    Ok(())
}
