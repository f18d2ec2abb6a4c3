//! The HTTPS listener (mTLS, HTTP/1.1 and HTTP/2), the plain operations listener, the watchdog
//! and the shutdown/reload plumbing. Request handling itself lives in `handlers`.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use cis490_common::{notify, tls};

use crate::api;
use crate::auth::Tokens;
use crate::config::StoreKind;
use crate::config::{Config, ConfigError};
use crate::gate::Gate;
use crate::metrics::Metrics;
use crate::s3::{S3Options, S3Store};
use crate::store::{EpisodeStore, FsOptions, FsStore, Store};

/// How often the work loops bump their heartbeat counters.
pub const HEARTBEAT: Duration = Duration::from_millis(250);

/// Time granted to in-flight requests after SIGTERM before they are cut off.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(8);

pub struct AppState {
    pub cfg: Config,
    pub config_path: PathBuf,
    pub tls: ArcSwap<ServerConfig>,
    pub tokens: ArcSwap<Option<Tokens>>,
    pub store: Store,
    pub gate: Arc<Gate>,
    pub metrics: Arc<Metrics>,
    pub uploads: Arc<Semaphore>,
    pub host_slots: Arc<crate::slots::HostSlots>,
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
    /// Store probes actually run (each writes a file or an object).
    pub probes_run: AtomicU64,
    pub accept_heartbeat: AtomicU64,
}

/// How long a store-writability probe answers for.
const PROBE_TTL: Duration = Duration::from_secs(1);

impl AppState {
    /// The store's writability, probed at most once a second; concurrent callers wait for the
    /// one probe in progress and share its answer.
    pub async fn probe_store(&self) -> Result<(), String> {
        let mut cache = self.probe_cache.lock().await;
        if let Some((at, answer)) = cache.as_ref() {
            if at.elapsed() < PROBE_TTL {
                return answer.clone();
            }
        }
        self.probes_run.fetch_add(1, Ordering::Relaxed);
        let answer = self.store.probe().await;
        *cache = Some((tokio::time::Instant::now(), answer.clone()));
        answer
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
pub fn open_s3(cfg: &Config, cfg_path: &Path) -> Result<S3Store, ConfigError> {
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
    })
    .map_err(|e| ConfigError::new(cfg_path, "store.endpoint", e))
}

/// A configured receiver, ready to serve on listeners the caller bound.
#[derive(Clone)]
pub struct Receiver {
    pub state: Arc<AppState>,
}

fn load_tls(cfg: &Config, path: &Path) -> Result<ServerConfig, ConfigError> {
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

fn load_tokens(cfg: &Config, path: &Path) -> Result<Option<Tokens>, ConfigError> {
    match &cfg.auth.tokens_file {
        None => Ok(None),
        Some(f) => Tokens::load(f).map(Some).map_err(|e| {
            ConfigError::new(path, "auth.tokens_file", format!("{}: {e}", f.display()))
        }),
    }
}

impl Receiver {
    /// Checks everything the config names (certificates, tokens, store) and opens the store.
    pub fn new(cfg: Config, config_path: &Path) -> Result<Receiver, ConfigError> {
        cfg.validate(config_path)?;
        let tls_cfg = load_tls(&cfg, config_path)?;
        let tokens = load_tokens(&cfg, config_path)?;
        let metrics = Arc::new(Metrics::default());
        let store = match cfg.store.kind {
            StoreKind::Fs => {
                let store = FsStore::open(
                    &cfg.store_dir,
                    &FsOptions {
                        max_uncompressed: cfg.limits.max_uncompressed_bytes,
                        quarantine_keep_days: cfg.quarantine.keep_days,
                        quarantine_max_bytes: cfg.quarantine.max_bytes,
                        quarantine_max_entries: cfg.quarantine.max_entries,
                    },
                )
                .map_err(|e| ConfigError::new(config_path, "store_dir", e.to_string()))?;
                if let Ok(q) = store.clean_quarantine() {
                    metrics.quarantine_bytes.store(q, Ordering::Relaxed);
                }
                Store::Fs(store)
            }
            // Nothing is contacted here: a bucket that is down at start is answered 503 and
            // shown by /healthz, like one that goes down later.
            StoreKind::S3 => Store::S3(open_s3(&cfg, config_path)?),
        };
        let gate = Arc::new(
            Gate::new(cfg.version_gate.clone())
                .map_err(|(key, msg)| ConfigError::new(config_path, key, msg))?,
        );
        if !gate.enabled() {
            tracing::warn!("version gate is DISABLED: any well-formed commit is admitted");
        }
        let uploads = Arc::new(Semaphore::new(cfg.limits.max_concurrent_uploads));
        Ok(Receiver {
            state: Arc::new(AppState {
                config_path: config_path.to_path_buf(),
                tls: ArcSwap::from_pointee(tls_cfg),
                tokens: ArcSwap::from_pointee(tokens),
                store,
                gate,
                metrics,
                uploads,
                host_slots: crate::slots::HostSlots::new(cfg.limits.max_uploads_per_host),
                connections: Arc::new(Semaphore::new(cfg.limits.max_connections)),
                handshakes: Arc::new(Semaphore::new(cfg.limits.max_handshakes)),
                probe_cache: tokio::sync::Mutex::new(None),
                tls_generation: tokio::sync::watch::Sender::new(0),
                probes_run: AtomicU64::new(0),
                accept_heartbeat: AtomicU64::new(0),
                cfg,
            }),
        })
    }

    /// `check-config`: everything [`Receiver::new`] checks, without taking or touching the
    /// store (a receiver may be serving from it).
    pub fn check(cfg: &Config, config_path: &Path) -> Result<(), ConfigError> {
        cfg.validate(config_path)?;
        load_tls(cfg, config_path)?;
        load_tokens(cfg, config_path)?;
        Gate::new(cfg.version_gate.clone())
            .map_err(|(key, msg)| ConfigError::new(config_path, key, msg))?;
        match cfg.store.kind {
            StoreKind::Fs => FsStore::check(&cfg.store_dir)
                .map_err(|e| ConfigError::new(config_path, "store_dir", e.to_string())),
            StoreKind::S3 => open_s3(cfg, config_path).map(|_| ()),
        }
    }

    /// Re-reads certificates and tokens (SIGHUP); on error the old ones stay in force.
    pub fn reload(&self) -> Result<(), ConfigError> {
        let s = &self.state;
        let tls_cfg = load_tls(&s.cfg, &s.config_path)?;
        let tokens = load_tokens(&s.cfg, &s.config_path)?;
        s.tls.store(Arc::new(tls_cfg));
        s.tokens.store(Arc::new(tokens));
        s.tls_generation.send_modify(|g| *g += 1);
        Ok(())
    }

    /// Serves until `shutdown` fires, then drains in-flight requests for up to [`DRAIN_DEADLINE`].
    pub async fn serve(
        &self,
        listener: TcpListener,
        ops: Option<TcpListener>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let state = self.state.clone();
        let tasks = CancellationToken::new();
        let refresher = tokio::spawn(state.gate.clone().run_refresher(tasks.clone()));
        if let Some(ops) = ops {
            tokio::spawn(serve_ops(state.clone(), ops, tasks.clone()));
        }
        tokio::spawn(quarantine_janitor(state.clone(), tasks.clone()));
        if let Some(every) = notify::watchdog_interval() {
            tokio::spawn(watchdog(state.clone(), every, tasks.clone()));
        }
        // Cancelled at stop: every connection then shuts down gracefully (in-flight requests
        // finish, HTTP/2 sends GOAWAY) and the drain below waits for them.
        let drain = CancellationToken::new();
        // The accept loop's heartbeat; a few per watchdog period even at short test periods.
        let mut tick = tokio::time::interval(HEARTBEAT);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {
                    state.accept_heartbeat.fetch_add(1, Ordering::Relaxed);
                }
                accepted = listener.accept() => {
                    state.accept_heartbeat.fetch_add(1, Ordering::Relaxed);
                    match accepted {
                        Ok((stream, peer)) => {
                            // Over max_connections: closed before any TLS work is spent on it.
                            let Ok(permit) = state.connections.clone().try_acquire_owned() else {
                                let n = state.metrics.connections_refused_total.fetch_add(1, Ordering::Relaxed);
                                if (n + 1).is_power_of_two() {
                                    tracing::warn!(peer = %peer, refused = n + 1, limit = state.cfg.limits.max_connections, "connection limit reached: closing new connections (limits.max_connections)");
                                }
                                drop(stream);
                                continue;
                            };
                            let _ = stream.set_nodelay(true);
                            let st = state.clone();
                            let drain = drain.clone();
                            tokio::spawn(async move {
                                st.metrics.connections_open.fetch_add(1, Ordering::Relaxed);
                                connection(st.clone(), stream, peer, drain).await;
                                st.metrics.connections_open.fetch_sub(1, Ordering::Relaxed);
                                drop(permit);
                            });
                        }
                        Err(e) => {
                            // EMFILE and friends: back off instead of spinning.
                            tracing::warn!(error = %e, "failed to accept a connection");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            }
        }
        drop(listener);
        tracing::info!("shutting down: draining in-flight requests");
        drain.cancel();
        let deadline = tokio::time::Instant::now() + DRAIN_DEADLINE;
        while state.metrics.connections_open.load(Ordering::Relaxed) > 0 {
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!("drain deadline passed; aborting the remaining requests");
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tasks.cancel();
        let _ = refresher.await;
        Ok(())
    }
}

async fn connection(
    state: Arc<AppState>,
    stream: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    drain: CancellationToken,
) {
    // Taken before the TLS material is: a reload from here on closes this connection.
    let generation = state.tls_generation.subscribe();
    let header_timeout = Duration::from_secs(state.cfg.limits.header_timeout_s);
    let deadline = tokio::time::Instant::now() + header_timeout;
    // A connection that has sent nothing holds no handshake slot; waiting for its first byte
    // and for a slot both count against the header timeout.
    let handshake = async {
        stream.readable().await?;
        let _slot = state
            .handshakes
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| std::io::Error::other("receiver is stopping"))?;
        let acceptor = TlsAcceptor::from(state.tls.load_full());
        acceptor.accept(stream).await
    };
    let tls = match tokio::time::timeout_at(deadline, handshake).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::info!(peer = %peer, error = %e, "TLS handshake refused");
            return;
        }
        Err(_) => {
            tracing::info!(peer = %peer, "TLS handshake timed out");
            return;
        }
    };
    let (_, conn) = tls.get_ref();
    let identity = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(tls::identity);
    let h2 = conn.alpn_protocol() == Some(b"h2");
    let identity: Arc<Option<String>> = Arc::new(identity);
    let st = state.clone();
    let activity = Arc::new(Activity::default());
    let act = activity.clone();
    let svc = service_fn(move |req| {
        let st = st.clone();
        let id = identity.clone();
        let busy = act.begin();
        async move {
            let resp = api::handle(st, id, req).await;
            drop(busy);
            Ok::<_, Infallible>(resp)
        }
    });
    let idle = Duration::from_secs(state.cfg.limits.idle_timeout_s);
    let on_reload = reloaded(generation);
    let io = TokioIo::new(tls);
    let ends = Ends {
        state: &state,
        activity: &activity,
        idle,
        drain: &drain,
    };
    let result = if h2 {
        let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        b.timer(TokioTimer::new())
            .keep_alive_interval(Some(Duration::from_secs(30)))
            .max_concurrent_streams(256)
            .initial_stream_window_size(256 * 1024)
            .initial_connection_window_size(1024 * 1024);
        let conn = b.serve_connection(io, svc);
        drive(conn, |c| c.graceful_shutdown(), ends, on_reload).await
    } else {
        let mut b = hyper::server::conn::http1::Builder::new();
        b.timer(TokioTimer::new())
            .header_read_timeout(Some(header_timeout))
            .max_buf_size(64 * 1024)
            .keep_alive(true);
        let conn = b.serve_connection(io, svc);
        drive(conn, |c| c.graceful_shutdown(), ends, on_reload).await
    };
    if let Err(e) = result {
        tracing::debug!(peer = %peer, error = %e, "connection ended with an error");
    }
}

/// What ends a connection besides its client: the receiver stopping, no request for
/// `idle`, a reload of the TLS material (SPEC §16).
struct Ends<'a> {
    state: &'a AppState,
    activity: &'a Activity,
    idle: Duration,
    drain: &'a CancellationToken,
}

/// Serves `conn` to its end. At the first of the `Ends` it is shut down gracefully with
/// `shut`: requests in progress finish (an HTTP/2 client gets GOAWAY), then it closes.
async fn drive<C, S>(
    conn: C,
    shut: S,
    ends: Ends<'_>,
    reloaded: impl std::future::Future<Output = ()>,
) -> Result<(), hyper::Error>
where
    C: std::future::Future<Output = Result<(), hyper::Error>>,
    S: Fn(std::pin::Pin<&mut C>),
{
    tokio::pin!(conn);
    tokio::pin!(reloaded);
    let mut closing = false;
    loop {
        tokio::select! {
            r = &mut conn => return r,
            () = ends.activity.idle_for(ends.idle), if !closing => {
                ends.state.metrics.connections_idle_closed_total.fetch_add(1, Ordering::Relaxed);
                shut(conn.as_mut());
                closing = true;
            }
            () = &mut reloaded, if !closing => {
                shut(conn.as_mut());
                closing = true;
            }
            () = ends.drain.cancelled(), if !closing => {
                shut(conn.as_mut());
                closing = true;
            }
        }
    }
}

/// Resolves once the TLS material has been reloaded since `generation` was taken.
async fn reloaded(mut generation: tokio::sync::watch::Receiver<u64>) {
    if generation.changed().await.is_err() {
        // The sender lives as long as the receiver's state: never reloaded.
        std::future::pending::<()>().await;
    }
}

/// Requests in progress on one connection and when the last one ended, for
/// `[limits] idle_timeout_s`: a connection is idle only while no request is in progress.
#[derive(Debug)]
struct Activity {
    busy: AtomicU64,
    last: std::sync::Mutex<tokio::time::Instant>,
}

impl Default for Activity {
    fn default() -> Self {
        Activity {
            busy: AtomicU64::new(0),
            last: std::sync::Mutex::new(tokio::time::Instant::now()),
        }
    }
}

struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.touch();
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Activity {
    fn begin(self: &Arc<Self>) -> Busy {
        self.busy.fetch_add(1, Ordering::Relaxed);
        self.touch();
        Busy(self.clone())
    }

    fn touch(&self) {
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = tokio::time::Instant::now();
    }

    /// Resolves once no request has been in progress for `idle`.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let since = *self.last.lock().unwrap_or_else(|p| p.into_inner());
            let due = since + idle;
            if self.busy.load(Ordering::Relaxed) == 0 && tokio::time::Instant::now() >= due {
                return;
            }
            let next = if self.busy.load(Ordering::Relaxed) > 0 {
                // Looked at again later; a request in progress keeps the connection open.
                tokio::time::Instant::now() + idle.max(Duration::from_millis(200))
            } else {
                due
            };
            tokio::time::sleep_until(next).await;
        }
    }
}

/// Feeds the systemd watchdog only while the accept loop and the gate refresher have both moved
/// within the watchdog period (`every` is half of it).
async fn watchdog(state: Arc<AppState>, every: Duration, stop: CancellationToken) {
    let window = every * 2;
    let now = std::time::Instant::now();
    let mut accept = (u64::MAX, now);
    let mut gate = (u64::MAX, now);
    loop {
        let now = std::time::Instant::now();
        for (seen, value) in [
            (&mut accept, state.accept_heartbeat.load(Ordering::Relaxed)),
            (&mut gate, state.gate.heartbeat.load(Ordering::Relaxed)),
        ] {
            if seen.0 != value {
                *seen = (value, now);
            }
        }
        if accept.1.elapsed() < window && gate.1.elapsed() < window {
            notify::watchdog();
        } else {
            tracing::error!("a work loop stalled; withholding the watchdog heartbeat");
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

async fn quarantine_janitor(state: Arc<AppState>, stop: CancellationToken) {
    let mut first = true;
    loop {
        // The fs store applied retention when it opened; the S3 one starts here.
        let wait = if first && matches!(state.store, Store::S3(_)) {
            Duration::from_secs(1)
        } else {
            Duration::from_secs(3600)
        };
        first = false;
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        match state.store.clean_quarantine().await {
            Ok(q) => state.metrics.quarantine_bytes.store(q, Ordering::Relaxed),
            Err(e) => {
                tracing::warn!(error = %e, "failed to apply the receiver quarantine retention")
            }
        }
    }
}

async fn serve_ops(state: Arc<AppState>, listener: TcpListener, stop: CancellationToken) {
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(_) => { tokio::time::sleep(Duration::from_millis(100)).await; continue; }
            }
        };
        let st = state.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let st = st.clone();
                async move { Ok::<_, Infallible>(ops_response(&st, req.uri().path()).await) }
            });
            let mut b = hyper::server::conn::http1::Builder::new();
            b.timer(TokioTimer::new())
                .header_read_timeout(Some(Duration::from_secs(10)));
            let _ = b.serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}

async fn ops_response(state: &Arc<AppState>, path: &str) -> hyper::Response<Full<Bytes>> {
    let text = |status: u16, ct: &str, body: String| {
        hyper::Response::builder()
            .status(status)
            .header("content-type", ct)
            .body(Full::new(Bytes::from(body)))
            .unwrap_or_default()
    };
    match path {
        "/healthz" => {
            let mut problems = Vec::new();
            if !state.gate.ready() {
                let why = state
                    .gate
                    .view()
                    .last_error
                    .unwrap_or_else(|| "not loaded yet".into());
                problems.push(format!("version gate has no commit list: {why}"));
            }
            if let Err(e) = state.probe_store().await {
                problems.push(e);
            }
            let mut body = serde_json::json!({
                "ok": problems.is_empty(),
                "problems": problems,
                "store": state.store.describe(),
                "gate": state.gate.view(),
            });
            if !state.gate.enabled() {
                body["warning"] =
                    "version gate is disabled: any well-formed commit is admitted".into();
            }
            text(
                if problems.is_empty() { 200 } else { 503 },
                "application/json",
                body.to_string() + "\n",
            )
        }
        "/metrics" => {
            let mut out = String::new();
            state.metrics.render(&mut out);
            state.gate.render_metrics(&mut out);
            state.store.render_metrics(&mut out);
            out.push_str(&format!(
                "# HELP cis490_receiver_store_probes_total Store writability probes run for /healthz (at most one a second).\n# TYPE cis490_receiver_store_probes_total counter\ncis490_receiver_store_probes_total {}\n",
                state.probes_run.load(Ordering::Relaxed)
            ));
            let handshaking = state
                .cfg
                .limits
                .max_handshakes
                .saturating_sub(state.handshakes.available_permits());
            out.push_str(&format!(
                "# HELP cis490_receiver_handshakes_in_progress TLS handshakes running (at most limits.max_handshakes).\n# TYPE cis490_receiver_handshakes_in_progress gauge\ncis490_receiver_handshakes_in_progress {handshaking}\n"
            ));
            text(200, "text/plain; version=0.0.4", out)
        }
        _ => text(404, "text/plain", "not found\n".into()),
    }
}
