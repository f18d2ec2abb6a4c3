//! Command line of `cis490-receiver` (SPEC §7). Each command returns a `Result`; the exit
//! code is decided by the error (`cis490_common::cli`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use cis490_common::cli::{self, CliError, ConfigFlag, EXIT_CONFIG, EXIT_FAILURE};
use cis490_common::notify;

use crate::config::{self, Config};
use crate::server::Receiver;
use crate::setup::offline_store;
use crate::store::Offline;

#[derive(Debug, Parser)]
#[command(
    name = "cis490-receiver",
    version = cis490_common::LONG_VERSION,
    about = "Admits lab episodes from current code over mutual TLS and stores them durably"
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
    /// Check every indexed episode against the store: there, whole, decompresses, same SHA-256.
    Scrub {
        /// Move truncated and corrupt bodies to the quarantine, so their next upload is stored.
        #[arg(long)]
        repair: bool,
        /// One JSON object per bad episode, then the totals.
        #[arg(long)]
        json: bool,
        /// Read at most this many bytes a second (0: no limit; default `[store]
        /// scrub_max_bytes_per_s`).
        #[arg(long, value_name = "N")]
        max_bytes_per_s: Option<u64>,
    },
    /// Print every lab host's state from the running receiver (exit 1 if any is not ok).
    Fleet {
        /// Print the JSON of /v1/fleet instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Clone, Subcommand)]
pub enum PkiCommand {
    /// Make the lab's CA and the receiver's server certificate in DIR (refuses if DIR holds a CA).
    Init {
        /// The lab PKI directory to create (mode 0700).
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// A DNS name or IP address the receiver is reached by (repeat; default: this
        /// machine's hostname and localhost).
        #[arg(long = "name", value_name = "NAME")]
        names: Vec<String>,
        /// Lifetime of the CA in days.
        #[arg(long, default_value_t = crate::pki::CA_DAYS)]
        days: u32,
        /// Lifetime of the receiver's certificate in days.
        #[arg(long, default_value_t = crate::pki::SERVER_DAYS)]
        server_days: u32,
    },
    /// Issue (or renew) a lab host's client certificate, signed by the CA in DIR.
    Issue {
        host_id: String,
        /// The lab PKI directory (ca.pem, ca.key).
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// Lifetime in days.
        #[arg(long, default_value_t = crate::pki::HOST_DAYS)]
        days: u32,
        /// Where to write HOST_ID.pem, HOST_ID.key and ca.pem (default DIR/hosts/HOST_ID/).
        #[arg(long, value_name = "OUT")]
        out: Option<PathBuf>,
    },
    /// List every certificate of DIR with its expiry (exit 1 if one expires within 30 days).
    List {
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// One JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Revoke HOST_ID's current certificate into DIR/crl.pem (point [tls] crl_file at it,
    /// then reload the receiver with SIGHUP).
    Revoke {
        host_id: String,
        /// The lab PKI directory (ca.pem, ca.key, hosts/<HOST_ID>/<HOST_ID>.pem).
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
    },
}

/// `scrub`: the findings as lines (or JSON objects) as they come, then the totals; the same
/// output for both stores.
fn scrub(
    store: &Offline,
    rt: &tokio::runtime::Runtime,
    repair: bool,
    json: bool,
    per_s: u64,
) -> Result<(), CliError> {
    use crate::store::scrub::{scrub_fs, Finding};
    let report = |f: &Finding| {
        if json {
            println!("{}", serde_json::to_string(f).unwrap_or_default());
        } else {
            println!("{} {} {}", f.host_id, f.episode_id, f.problem.as_str());
            eprintln!("  {}", f.detail);
        }
    };
    let tally = match store {
        Offline::Fs {
            root,
            max_uncompressed,
        } => scrub_fs(root, *max_uncompressed, per_s, repair, &|| false, report),
        Offline::S3(s) => rt.block_on(s.scrub(per_s, repair, &|| false, report)),
    }
    .map_err(|e| CliError::failure(format_args!("failed to scrub {}: {e:#}", store.describe())))?;
    if json {
        println!("{}", serde_json::to_string(&tally).unwrap_or_default());
    } else {
        println!(
            "{} checked, {} missing, {} truncated, {} corrupt",
            tally.checked, tally.missing, tally.truncated, tally.corrupt
        );
    }
    if tally.bad() > 0 {
        return Err(CliError::reported(EXIT_FAILURE));
    }
    Ok(())
}

/// A `pki` failure as an exit status: 2 for what the command line got wrong, 1 otherwise.
fn pki_error(verb: &str, e: crate::pki::PkiError) -> CliError {
    use crate::pki::PkiError;
    let code = match e {
        PkiError::BadHostId(..) | PkiError::Usage(_) => EXIT_CONFIG,
        PkiError::File { .. } | PkiError::CaExists(_) => EXIT_FAILURE,
    };
    CliError::new(code, format_args!("pki {verb}: {e}"))
}

fn pki(cmd: &PkiCommand) -> Result<(), CliError> {
    match cmd {
        PkiCommand::Init {
            dir,
            names,
            days,
            server_days,
        } => {
            let made = crate::pki::init(dir, names, *days, *server_days)
                .map_err(|e| pki_error("init", e))?;
            println!(
                "made the lab CA {} (key ca.key beside it, mode 0600)",
                made.ca.display()
            );
            println!(
                "made the receiver's certificate {} for {}",
                made.server.display(),
                made.names.join(", ")
            );
            println!("in receiver.toml:");
            println!("  [tls]");
            println!("  cert_file = \"{}\"", made.server.display());
            println!("  key_file = \"{}\"", made.server_key.display());
            println!("  client_ca_file = \"{}\"", made.ca.display());
            println!(
                "then, for each lab host: cis490-receiver pki issue HOST_ID --dir {}",
                dir.display()
            );
            Ok(())
        }
        PkiCommand::Issue {
            host_id,
            dir,
            days,
            out,
        } => {
            let i = crate::pki::issue(dir, host_id, *days, out.as_deref())
                .map_err(|e| pki_error("issue", e))?;
            let out_dir = i.cert.parent().unwrap_or(dir);
            if i.renewed {
                println!("renewed {host_id}'s certificate (new key, serial {}); the old one stays valid until it expires (revoke it with `pki revoke` once the host uses the new one)", i.serial);
            } else {
                println!("issued {host_id}'s certificate (serial {})", i.serial);
            }
            println!(
                "  {}\n  {} (mode 0600)\n  {}",
                i.cert.display(),
                i.key.display(),
                i.ca.display()
            );
            println!("put them on the lab host:");
            println!(
                "  scp {d}/{h}.pem {d}/{h}.key {d}/ca.pem {h}:/tmp/",
                d = out_dir.display(),
                h = host_id
            );
            println!(
                "  ssh {h} 'sudo install -o root -g cis490 -m 0640 /tmp/{h}.pem /tmp/ca.pem /etc/cis490/ && sudo install -o root -g cis490 -m 0640 /tmp/{h}.key /etc/cis490/ && rm /tmp/{h}.pem /tmp/{h}.key /tmp/ca.pem && sudo systemctl restart cis490-shipper'",
                h = host_id
            );
            println!("in its /etc/cis490/lab-host.toml:");
            println!("  [receiver]");
            println!("  ca_file = \"/etc/cis490/ca.pem\"");
            println!("  cert_file = \"/etc/cis490/{host_id}.pem\"");
            println!("  key_file = \"/etc/cis490/{host_id}.key\"");
            Ok(())
        }
        PkiCommand::List { dir, json } => {
            let (all, unreadable) = crate::pki::list(dir).map_err(|e| pki_error("list", e))?;
            for why in &unreadable {
                eprintln!("cis490-receiver: pki list: {why}");
            }
            if *json {
                let text = serde_json::to_string_pretty(&all)
                    .map_err(|e| CliError::failure(format_args!("pki list: {e}")))?;
                println!("{text}");
            } else {
                println!(
                    "{:<8} {:<6} {:<34} {:<22} SUBJECT (SERIAL)",
                    "STATUS", "DAYS", "FILE", "NOT AFTER"
                );
                for l in &all {
                    let status = if l.revoked {
                        "revoked"
                    } else if l.days_left < 0 {
                        "EXPIRED"
                    } else if l.days_left < crate::pki::WARN_DAYS {
                        "RENEW"
                    } else {
                        "ok"
                    };
                    let file = l.file.strip_prefix(dir).unwrap_or(&l.file);
                    println!(
                        "{status:<8} {:<6} {:<34} {:<22} {} ({})",
                        l.days_left,
                        file.display(),
                        l.not_after,
                        l.subject,
                        l.serial
                    );
                }
            }
            let soon: Vec<&crate::pki::Listed> = all
                .iter()
                .filter(|l| !l.revoked && l.days_left < crate::pki::WARN_DAYS)
                .collect();
            if soon.is_empty() && unreadable.is_empty() {
                return Ok(());
            }
            if soon.is_empty() {
                return Err(CliError::failure(format_args!(
                    "{} certificate file(s) could not be read",
                    unreadable.len()
                )));
            }
            Err(CliError::failure(format_args!(
                "{} certificate(s) expire within {} days: renew hosts with `cis490-receiver pki issue HOST_ID --dir {}`",
                soon.len(),
                crate::pki::WARN_DAYS,
                dir.display()
            )))
        }
        PkiCommand::Revoke { host_id, dir } => {
            let r = crate::pki::revoke(dir, host_id).map_err(|e| pki_error("revoke", e))?;
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
            Ok(())
        }
    }
}

pub fn main() -> ExitCode {
    cis490_common::memory::limit_malloc_arenas();
    let cli = Cli::parse();
    cis490_common::logging::init();
    cli::exit("cis490-receiver", run(cli))
}

fn run(cli: Cli) -> Result<(), CliError> {
    if let Some(Command::Pki(cmd)) = &cli.command {
        return pki(cmd);
    }
    let path = cli.config.resolve(config::ENV_PATH, config::DEFAULT_PATH);
    let cfg = Config::load(&path)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::failure(format_args!("failed to start the runtime: {e}")))?;
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => {
            let outcome = rt.block_on(serve(cfg, path));
            // Validators still blocked on a disk must not hold up the exit; their temp files
            // are removed on the next start.
            rt.shutdown_timeout(std::time::Duration::from_secs(1));
            outcome
        }
        Command::CheckConfig => {
            Receiver::check(&cfg, &path)?;
            println!("{}: ok", path.display());
            Ok(())
        }
        Command::Reindex => {
            let store = offline_store(&cfg, &path)?;
            let r = rt.block_on(store.reindex()).map_err(|e| {
                CliError::failure(format_args!(
                    "failed to reindex {}: {e:#}",
                    store.describe()
                ))
            })?;
            println!(
                "reindexed {} episode(s); {} {} skipped",
                r.ok, r.bad, r.unit
            );
            Ok(())
        }
        Command::ExportIndex => {
            let store = offline_store(&cfg, &path)?;
            let mut out = std::io::BufWriter::new(std::io::stdout());
            rt.block_on(store.export_index(&mut out))
                .and_then(|()| std::io::Write::flush(&mut out).map_err(Into::into))
                .map_err(|e| CliError::failure(format_args!("failed to export the index: {e:#}")))
        }
        Command::Gate => rt.block_on(gate_once(cfg, &path)),
        Command::Pki(cmd) => pki(&cmd),
        Command::Fleet { json } => crate::fleet::client::run(cfg.metrics_listen, json),
        Command::Scrub {
            repair,
            json,
            max_bytes_per_s,
        } => {
            let pace = max_bytes_per_s.unwrap_or(cfg.store.scrub_max_bytes_per_s);
            let store = offline_store(&cfg, &path)?;
            scrub(&store, &rt, repair, json, pace)
        }
    }
}

async fn gate_once(cfg: Config, path: &std::path::Path) -> Result<(), CliError> {
    let gate = crate::setup::gate(&cfg, path)?;
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
    refreshed.map_err(|_| CliError::reported(EXIT_FAILURE))
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

async fn serve(cfg: Config, path: PathBuf) -> Result<(), CliError> {
    raise_nofile_limit(cfg.limits.max_connections as u64 + 256);
    let (listen, metrics_listen) = (cfg.listen, cfg.metrics_listen);
    let receiver = Receiver::new(cfg, &path)?;
    // Installed before anything announces the receiver as up: a SIGTERM that follows the
    // "receiver listening" line (or READY=1) is always a clean, drained stop, never the
    // default action's abrupt exit.
    let shutdown = CancellationToken::new();
    spawn_signals(receiver.clone(), shutdown.clone())
        .map_err(|e| CliError::failure(format_args!("failed to install signal handlers: {e}")))?;
    let bind = |addr: std::net::SocketAddr, key: &'static str| {
        let path = &path;
        async move {
            tokio::net::TcpListener::bind(addr).await.map_err(|e| {
                CliError::failure(format_args!(
                    "failed to listen on {addr} ({key} in {}): {e}",
                    path.display()
                ))
            })
        }
    };
    let listener = bind(listen, "listen").await?;
    let ops = bind(metrics_listen, "metrics_listen").await?;
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
    match receiver.serve(listener, Some(ops), shutdown).await {
        Ok(()) => {
            tracing::info!("receiver stopped");
            Ok(())
        }
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "receiver failed");
            Err(CliError::reported(EXIT_FAILURE))
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
