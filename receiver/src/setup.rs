//! Receiver start-up: everything the config names (certificates, tokens, key files, the
//! store, the gate) is read and checked here, once, and becomes the shared [`AppState`]. The
//! config itself was validated when it was parsed ([`Config::parse`]).

use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use tokio::sync::Semaphore;

use cis490_common::tls;

use crate::auth::Tokens;
use crate::config::{Config, ConfigError, StoreKind};
use crate::gate::Gate;
use crate::metrics::Metrics;
use crate::state::AppState;
use crate::store::{FsOptions, FsStore, Offline, S3Options, S3Store, Store};

/// Opens the store and builds the state a receiver serves from.
pub(crate) fn state(cfg: Config, config_path: &Path) -> Result<AppState, ConfigError> {
    let tls_cfg = load_tls(&cfg, config_path)?;
    let tokens = load_tokens(&cfg, config_path)?;
    let metrics = Arc::new(Metrics::default());
    let store = open_store(&cfg, config_path, &metrics)?;
    let gate = Arc::new(gate(&cfg, config_path)?);
    if !gate.enabled() {
        tracing::warn!("version gate is DISABLED: any well-formed commit is admitted");
    }
    let decoders = crate::decoders::DecoderBudget::with_metrics(
        cfg.limits.decoder_memory_bytes,
        metrics.decoder_memory.clone(),
        metrics.decoder_memory_refused.clone(),
        metrics.decoder_memory_spooled.clone(),
    );
    Ok(AppState {
        config_path: config_path.to_path_buf(),
        tls: ArcSwap::from_pointee(tls_cfg),
        tokens: ArcSwap::from_pointee(tokens),
        store,
        gate,
        metrics,
        fleet: Arc::new(crate::fleet::Fleet::new(Duration::from_secs(
            cfg.fleet.silent_after_s,
        ))),
        uploads: Arc::new(Semaphore::new(cfg.limits.max_concurrent_uploads)),
        host_slots: crate::slots::HostSlots::new(cfg.limits.max_uploads_per_host),
        decoders,
        connections: Arc::new(Semaphore::new(cfg.limits.max_connections)),
        handshakes: Arc::new(Semaphore::new(cfg.limits.max_handshakes)),
        probe_cache: tokio::sync::Mutex::new(None),
        tls_generation: tokio::sync::watch::Sender::new(0),
        accept_heartbeat: AtomicU64::new(0),
        binary: cis490_common::binary::BinaryWatch::of_self(),
        cfg,
    })
}

/// `check-config`: everything [`state`] checks, without taking or touching the store (a
/// receiver may be serving from it).
pub(crate) fn check(cfg: &Config, config_path: &Path) -> Result<(), ConfigError> {
    load_tls(cfg, config_path)?;
    load_tokens(cfg, config_path)?;
    gate(cfg, config_path)?;
    match cfg.store.kind {
        StoreKind::Fs => FsStore::check(&cfg.store_dir)
            .map_err(|e| ConfigError::new(config_path, "store_dir", e.to_string())),
        StoreKind::S3 => open_s3(cfg, config_path).map(|_| ()),
    }
}

/// The store for `reindex` and `export-index`, reached without opening it for serving.
pub(crate) fn offline_store(cfg: &Config, config_path: &Path) -> Result<Offline, ConfigError> {
    Ok(match cfg.store.kind {
        StoreKind::Fs => Offline::Fs {
            root: cfg.store_dir.clone(),
            max_uncompressed: cfg.limits.max_uncompressed_bytes,
        },
        StoreKind::S3 => Offline::S3(open_s3(cfg, config_path)?),
    })
}

pub(crate) fn gate(cfg: &Config, config_path: &Path) -> Result<Gate, ConfigError> {
    Gate::new(cfg.version_gate.clone())
        .map_err(|(key, msg)| ConfigError::new(config_path, key, msg))
}

fn open_store(cfg: &Config, config_path: &Path, metrics: &Metrics) -> Result<Store, ConfigError> {
    match cfg.store.kind {
        StoreKind::Fs => {
            let store = FsStore::open(
                &cfg.store_dir,
                &FsOptions {
                    max_uncompressed: cfg.limits.max_uncompressed_bytes,
                    quarantine_keep_days: cfg.quarantine.keep_days,
                    quarantine_max_bytes: cfg.quarantine.max_bytes,
                    quarantine_max_entries: cfg.quarantine.max_entries,
                    resume_keep_s: cfg.limits.resume_keep_s,
                    resume_max_bytes: cfg.limits.resume_max_bytes,
                },
            )
            .map_err(|e| ConfigError::new(config_path, "store_dir", e.to_string()))?;
            if let Ok(q) = store.clean_quarantine() {
                Metrics::set_bytes(&metrics.quarantine_bytes, q);
            }
            Ok(Store::Fs(store))
        }
        // Nothing is contacted here: a bucket that is down at start is answered 503 and
        // shown by /healthz, like one that goes down later.
        StoreKind::S3 => Ok(Store::S3(open_s3(cfg, config_path)?)),
    }
}

fn read_secret(cfg_path: &Path, key: &str, file: Option<&Path>) -> Result<String, ConfigError> {
    let Some(file) = file else {
        return Err(ConfigError::new(
            cfg_path,
            key,
            "is required when store.kind = \"s3\"",
        ));
    };
    let text = std::fs::read_to_string(file)
        .map_err(|e| ConfigError::new(cfg_path, key, format!("{}: {e}", file.display())))?;
    let v = text.trim();
    if v.is_empty() {
        return Err(ConfigError::new(
            cfg_path,
            key,
            format!("{} is empty", file.display()),
        ));
    }
    Ok(v.to_string())
}

/// Builds the S3 store the config names (reads the key files; contacts nothing).
pub(crate) fn open_s3(cfg: &Config, cfg_path: &Path) -> Result<S3Store, ConfigError> {
    let st = &cfg.store;
    let access_key = read_secret(
        cfg_path,
        "store.access_key_file",
        st.access_key_file.as_deref(),
    )?;
    let secret_key = read_secret(
        cfg_path,
        "store.secret_key_file",
        st.secret_key_file.as_deref(),
    )?;
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    let instance = format!(
        "{}-{}",
        if host.is_empty() { "receiver" } else { &host },
        cfg.listen.port()
    );
    S3Store::new(S3Options {
        endpoint: st.endpoint.clone().unwrap_or_default(),
        region: st.region.clone().unwrap_or_else(|| "us-east-1".into()),
        bucket: st.bucket.clone().unwrap_or_default(),
        prefix: st.prefix.clone(),
        access_key,
        secret_key,
        request_timeout: Duration::from_secs(10),
        max_uncompressed: cfg.limits.max_uncompressed_bytes,
        quarantine_keep_days: cfg.quarantine.keep_days,
        quarantine_max_bytes: cfg.quarantine.max_bytes,
        quarantine_max_entries: cfg.quarantine.max_entries,
        instance,
        resume_keep_s: cfg.limits.resume_keep_s,
        resume_max_bytes: cfg.limits.resume_max_bytes,
    })
    .map_err(|e| ConfigError::new(cfg_path, "store.endpoint", e))
}

pub(crate) fn load_tls(cfg: &Config, path: &Path) -> Result<ServerConfig, ConfigError> {
    let files = tls::ServerTlsFiles {
        cert_file: &cfg.tls.cert_file,
        key_file: &cfg.tls.key_file,
        client_ca_file: &cfg.tls.client_ca_file,
        crl_file: cfg.tls.crl_file.as_deref(),
    };
    tls::server_config(&files).map_err(|e| {
        let key = e.config_key(&tls::TlsKeys {
            cert: (&cfg.tls.cert_file, "tls.cert_file"),
            key: (&cfg.tls.key_file, "tls.key_file"),
            ca: (&cfg.tls.client_ca_file, "tls.client_ca_file"),
            crl: cfg.tls.crl_file.as_deref().map(|p| (p, "tls.crl_file")),
            pair: "tls.cert_file/tls.key_file",
        });
        ConfigError::new(path, key, e.to_string())
    })
}

pub(crate) fn load_tokens(cfg: &Config, path: &Path) -> Result<Option<Tokens>, ConfigError> {
    match &cfg.auth.tokens_file {
        None => Ok(None),
        Some(f) => Tokens::load(f).map(Some).map_err(|e| {
            ConfigError::new(path, "auth.tokens_file", format!("{}: {e}", f.display()))
        }),
    }
}
