//! What every part of a running receiver shares: the config, the TLS material, the store,
//! the gate, the metrics and the limits' semaphores.

use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use tokio::sync::Semaphore;

use crate::auth::Tokens;
use crate::config::Config;
use crate::gate::Gate;
use crate::metrics::Metrics;
use crate::store::Store;

pub struct AppState {
    pub cfg: Config,
    pub config_path: PathBuf,
    pub tls: ArcSwap<ServerConfig>,
    pub tokens: ArcSwap<Option<Tokens>>,
    pub store: Store,
    pub gate: Arc<Gate>,
    pub metrics: Arc<Metrics>,
    /// Every lab host as the receiver has seen it (SPEC §11).
    pub(crate) fleet: Arc<crate::fleet::Fleet>,
    pub uploads: Arc<Semaphore>,
    pub host_slots: Arc<crate::slots::HostSlots>,
    /// The zstd decoders' memory budget (`[limits] decoder_memory_bytes`).
    pub decoders: Arc<crate::decoders::DecoderBudget>,
    /// `[limits] max_connections`: a permit per open API connection.
    pub connections: Arc<Semaphore>,
    /// `[limits] max_handshakes`: a permit per TLS handshake in progress.
    pub handshakes: Arc<Semaphore>,
    /// Bumped by every reload of the TLS material: connections made under older material
    /// close once they are idle, so a revoked or replaced certificate does not live on in a
    /// long HTTP/2 connection.
    pub tls_generation: tokio::sync::watch::Sender<u64>,
    /// The last store-writability probe and when it ran (at most one a second, SPEC §16).
    pub probe_cache: tokio::sync::Mutex<Option<(tokio::time::Instant, Result<(), String>)>>,
    pub accept_heartbeat: AtomicU64,
    /// The executable this process was started from, watched for replacement (SPEC §12).
    pub(crate) binary: Option<cis490_common::binary::BinaryWatch>,
}

/// How long a store-writability probe answers for.
const PROBE_TTL: Duration = Duration::from_secs(1);

/// What an operator runs when the receiver's binary has been replaced under it.
pub(crate) const RESTART: &str = "sudo systemctl restart cis490-receiver";

impl AppState {
    /// Looks whether the binary was replaced; the first time it is, says so once at ERROR and
    /// sets `cis490_receiver_binary_stale`. The receiver keeps serving either way.
    pub(crate) fn check_binary(&self) {
        let Some(watch) = &self.binary else {
            return;
        };
        if let Some(why) = watch.check() {
            self.metrics.binary_stale.set(1);
            tracing::error!(
                event = "stale_binary",
                path = %watch.path().display(),
                why = %why,
                fix = RESTART,
                "this receiver runs an old binary: {} was replaced since it started; restart it: {RESTART}",
                watch.path().display()
            );
        }
    }

    /// The store's writability, probed at most once a second; concurrent callers wait for the
    /// one probe in progress and share its answer.
    pub async fn probe_store(&self) -> Result<(), String> {
        let mut cache = self.probe_cache.lock().await;
        if let Some((at, answer)) = cache.as_ref() {
            if at.elapsed() < PROBE_TTL {
                return answer.clone();
            }
        }
        self.metrics.store_probes.inc();
        let answer = self.store.probe().await;
        *cache = Some((tokio::time::Instant::now(), answer.clone()));
        answer
    }
}
