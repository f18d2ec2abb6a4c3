//! The HTTPS listener (mTLS, HTTP/1.1 and HTTP/2): the accept loop, each connection's ends
//! (idle, reload, drain), the watchdog and the quarantine janitor. Start-up is `setup`,
//! requests are `api`, the operations listener is `ops`.

use std::convert::Infallible;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use cis490_common::{notify, tls};

use crate::config::{Config, ConfigError};
use crate::state::AppState;
use crate::store::Store;
use crate::{api, ops, setup};

/// How often the work loops bump their heartbeat counters.
pub(crate) const HEARTBEAT: Duration = Duration::from_millis(250);

/// Time granted to in-flight requests after SIGTERM before they are cut off.
pub(crate) const DRAIN_DEADLINE: Duration = Duration::from_secs(8);

/// A configured receiver, ready to serve on listeners the caller bound.
#[derive(Clone)]
pub struct Receiver {
    pub state: Arc<AppState>,
}

impl Receiver {
    /// Checks everything the config names (certificates, tokens, store) and opens the store.
    pub fn new(cfg: Config, config_path: &Path) -> Result<Receiver, ConfigError> {
        Ok(Receiver {
            state: Arc::new(setup::state(cfg, config_path)?),
        })
    }

    /// `check-config`: everything [`Receiver::new`] checks, without taking or touching the
    /// store (a receiver may be serving from it).
    pub fn check(cfg: &Config, config_path: &Path) -> Result<(), ConfigError> {
        setup::check(cfg, config_path)
    }

    /// Re-reads certificates and tokens (SIGHUP); on error the old ones stay in force.
    pub fn reload(&self) -> Result<(), ConfigError> {
        let s = &self.state;
        let tls_cfg = setup::load_tls(&s.cfg, &s.config_path)?;
        let tokens = setup::load_tokens(&s.cfg, &s.config_path)?;
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
        let refresher = tokio::spawn(state.gate.clone().run_refresher(HEARTBEAT, tasks.clone()));
        // Every task holding the state ends with `tasks`, and stop waits for them: the store
        // (and its lock) is released when `serve` returns.
        let mut background = vec![
            tokio::spawn(quarantine_janitor(state.clone(), tasks.clone())),
            tokio::spawn(fleet_from_index(state.clone(), tasks.clone())),
            tokio::spawn(binary_watch(state.clone(), tasks.clone())),
            tokio::spawn(background_scrub(state.clone(), tasks.clone())),
        ];
        if let Some(ops) = ops {
            background.push(tokio::spawn(ops::serve(state.clone(), ops, tasks.clone())));
        }
        if let Some(every) = notify::watchdog_interval() {
            background.push(tokio::spawn(watchdog(state.clone(), every, tasks.clone())));
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
                                let n = state.metrics.connections_refused.inc();
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
                                st.metrics.connections_open.inc();
                                connection(st.clone(), stream, peer, drain).await;
                                st.metrics.connections_open.dec();
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
        while state.metrics.connections_open.get() > 0 {
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!("drain deadline passed; aborting the remaining requests");
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tasks.cancel();
        let _ = refresher.await;
        for task in background {
            if tokio::time::timeout(BACKGROUND_STOP, task).await.is_err() {
                tracing::warn!("a background task did not stop in time");
            }
        }
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
    let caller = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|cert| {
            Some(api::Caller {
                host: tls::identity(cert)?,
                cert_not_after: tls::not_after(cert),
            })
        });
    let h2 = conn.alpn_protocol() == Some(b"h2");
    let caller: Arc<Option<api::Caller>> = Arc::new(caller);
    let st = state.clone();
    let activity = Arc::new(Activity::default());
    let act = activity.clone();
    let svc = service_fn(move |req| {
        let st = st.clone();
        let id = caller.clone();
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
                ends.state.metrics.connections_idle_closed.inc();
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

/// Gives the fleet view the stored counts of every host in the index (SPEC §11), in the
/// background: an S3 index is one object per episode.
async fn fleet_from_index(state: Arc<AppState>, stop: CancellationToken) {
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = read_index_into_fleet(&state) => {}
    }
}

async fn read_index_into_fleet(state: &AppState) {
    let started = std::time::Instant::now();
    let offline = match setup::offline_store(&state.cfg, &state.config_path) {
        Ok(o) => o,
        Err(e) => {
            tracing::error!(error = %e, "fleet view: cannot open the store to read its index");
            return;
        }
    };
    let mut lines = Vec::new();
    if let Err(e) = offline.export_index(&mut lines).await {
        tracing::error!(error = %e, "fleet view: failed to read the index; stored counts start from zero");
        state.fleet.load_index(std::iter::empty());
        return;
    }
    let rows = lines
        .split(|b| *b == b'\n')
        .filter_map(|l| serde_json::from_slice::<crate::store::IndexRow>(l).ok());
    state.fleet.load_index(rows);
    tracing::info!(
        seconds = started.elapsed().as_secs_f64(),
        "fleet view: stored counts read from the index"
    );
}

/// Scrubs the store every `[store] scrub_interval_s` (the first one an interval after start),
/// never repairing: each bad episode is an ERROR `event=scrub_problem` and a counter.
async fn background_scrub(state: Arc<AppState>, stop: CancellationToken) {
    let every = state.cfg.store.scrub_interval_s;
    if every == 0 {
        return;
    }
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(every)) => {}
        }
        let started = std::time::Instant::now();
        let outcome = match &state.store {
            Store::Fs(_) => {
                let st = state.clone();
                let halt = stop.clone();
                tokio::task::spawn_blocking(move || {
                    let cfg = &st.cfg;
                    crate::store::scrub::scrub_fs(
                        &cfg.store_dir,
                        cfg.limits.max_uncompressed_bytes,
                        cfg.store.scrub_max_bytes_per_s,
                        false,
                        &|| halt.is_cancelled(),
                        |f| scrub_problem(&st, f),
                    )
                })
                .await
                .unwrap_or_else(|e| Err(anyhow::anyhow!("the scrub task failed: {e}")))
            }
            Store::S3(s) => {
                let halt = stop.clone();
                let stopped = move || halt.is_cancelled();
                let scrub = s.scrub(
                    state.cfg.store.scrub_max_bytes_per_s,
                    false,
                    &stopped,
                    |f| scrub_problem(&state, f),
                );
                tokio::select! {
                    _ = stop.cancelled() => return,
                    r = scrub => r,
                }
            }
        };
        match outcome {
            Ok(t) => {
                state.metrics.scrub_checked.inc_by(t.checked);
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                state
                    .metrics
                    .scrub_last_completed
                    .set(i64::try_from(now).unwrap_or(i64::MAX));
                tracing::info!(
                    checked = t.checked,
                    missing = t.missing,
                    truncated = t.truncated,
                    corrupt = t.corrupt,
                    bytes_read = t.bytes_read,
                    seconds = started.elapsed().as_secs_f64(),
                    "background scrub finished"
                );
            }
            Err(e) => tracing::error!(error = %format!("{e:#}"), "background scrub failed"),
        }
    }
}

/// One bad episode found by the background scrub: counted, and logged for the operator.
fn scrub_problem(state: &AppState, f: &crate::store::scrub::Finding) {
    state.metrics.count_scrub_problem(f.problem.as_str());
    tracing::error!(
        event = "scrub_problem",
        host_id = %f.host_id,
        episode = %f.episode_id,
        problem = f.problem.as_str(),
        detail = %f.detail,
        fix = "cis490-receiver scrub --repair (then the host's next upload stores it again)",
        "a stored episode is not intact"
    );
}

/// How long a stopping receiver waits for each background task.
const BACKGROUND_STOP: Duration = Duration::from_secs(2);

/// How often the receiver looks whether its executable was replaced (SPEC §12); a scrape of
/// `/metrics` looks too.
const BINARY_CHECK_EVERY: Duration = Duration::from_secs(60);

async fn binary_watch(state: Arc<AppState>, stop: CancellationToken) {
    loop {
        state.check_binary();
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(BINARY_CHECK_EVERY) => {}
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
            Ok(q) => crate::metrics::Metrics::set_bytes(&state.metrics.quarantine_bytes, q),
            Err(e) => {
                tracing::warn!(error = %e, "failed to apply the receiver quarantine retention")
            }
        }
        // Expired prefixes of interrupted uploads go on the same round (SPEC §13).
        if let Some(r) = state.store.resumes().cloned() {
            match tokio::task::spawn_blocking(move || r.clean()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "failed to drop expired upload prefixes"),
                Err(e) => tracing::warn!(error = %e, "the resume cleanup task failed"),
            }
        }
        if let Store::S3(s) = &state.store {
            if let Err(e) = s.clean_resumes().await {
                tracing::warn!(error = %e, "failed to abort expired multipart uploads");
            }
        }
    }
}
