//! Talking to the receiver: mutual TLS with hyper over kept-alive HTTP/1.1 connections, the
//! preflight `check`, the streamed PUT, and the mapping of every answer to what the queue does.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use bytes::{Bytes, BytesMut};
use http_body::Frame;
use http_body_util::{BodyExt, Empty, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use serde_json::Value;
use tokio::io::{AsyncRead, ReadBuf};
use tokio_rustls::TlsConnector;

use cis490_common::{headers, Disposition, Reason};

/// Tarballs above this size get a preflight `check` before their bytes are sent (SPEC §3).
pub const CHECK_THRESHOLD: u64 = 1 << 20;
/// After falling back to a later URL, the first is tried again after this long.
pub const FALLBACK_RESET: Duration = Duration::from_secs(300);

/// A receiver base URL: `https://host[:port][/prefix]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    pub prefix: String,
}

impl Endpoint {
    pub fn parse(url: &str) -> Result<Endpoint, String> {
        let rest = url.strip_prefix("https://").ok_or_else(|| {
            format!("{url:?} must start with https:// (the receiver needs mutual TLS)")
        })?;
        let (authority, prefix) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/').to_string()),
            None => (rest, String::new()),
        };
        let (host, port) = if let Some(h) = authority.strip_prefix('[') {
            let (h, p) = h
                .split_once(']')
                .ok_or_else(|| format!("{url:?}: bad IPv6 address"))?;
            (h.to_string(), p.strip_prefix(':').unwrap_or("443"))
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), p),
                None => (authority.to_string(), "443"),
            }
        };
        if host.is_empty() {
            return Err(format!("{url:?} has no host"));
        }
        let port = port
            .parse()
            .map_err(|_| format!("{url:?} has a bad port"))?;
        Ok(Endpoint { host, port, prefix })
    }

    fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// What the queue does with an episode after an attempt.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// 200/201: the receiver holds it durably.
    Stored { status: u16, body: Value },
    /// Never retried: quarantine with `reason`.
    Fatal {
        reason: Reason,
        status: u16,
        body: Option<Value>,
    },
    /// 401/403: keep, long backoff, loud.
    Auth { status: u16, body: Option<Value> },
    /// Anything that may pass later.
    Transient {
        detail: String,
        retry_after: Option<Duration>,
    },
}

/// Maps an HTTP status (with its JSON body) to an outcome, as SPEC §3's table says.
pub fn classify(status: u16, body: Option<Value>, retry_after: Option<Duration>) -> Outcome {
    match Disposition::of_status(status) {
        Disposition::Stored => Outcome::Stored {
            status,
            body: body.unwrap_or(Value::Null),
        },
        Disposition::Quarantine(reason) => Outcome::Fatal {
            reason,
            status,
            body,
        },
        Disposition::Auth => Outcome::Auth { status, body },
        Disposition::Transient => Outcome::Transient {
            detail: format!(
                "receiver answered {status}{}",
                body.as_ref()
                    .and_then(|b| b.get("error"))
                    .and_then(Value::as_str)
                    .map(|e| format!(" {e}"))
                    .unwrap_or_default()
            ),
            retry_after,
        },
    }
}

/// Parses `Retry-After` given in seconds (the form the receiver sends).
pub fn parse_retry_after(v: Option<&str>) -> Option<Duration> {
    v.and_then(|s| s.trim().parse::<u64>().ok())
        .map(|s| Duration::from_secs(s.min(24 * 3600)))
}

/// An episode ready to send.
#[derive(Debug, Clone)]
pub struct Shipment {
    pub host_id: String,
    pub episode_id: String,
    pub commit: String,
    pub tar_sha256: String,
    pub tarball: crate::queue::Tarball,
    /// Body bytes sent for this episode: its idle timer and the watchdog watch it.
    pub progress: Arc<AtomicU64>,
}

type Sender = SendRequest<UploadBody>;

pub struct Transport {
    endpoints: Vec<Endpoint>,
    tls: Arc<rustls::ClientConfig>,
    token: Option<String>,
    connect_timeout: Duration,
    idle_timeout: Duration,
    limiter: Option<Arc<RateLimiter>>,
    current: AtomicUsize,
    fell_back_at: Mutex<Option<Instant>>,
    pool: Mutex<Vec<(usize, Sender)>>,
    /// HEAD of the install checkout, sent with every request (SPEC §11); the daemon replaces
    /// it at every scan, so a `git pull` shows without a restart.
    host_commit: ArcSwapOption<String>,
    /// Bytes sent, all uploads together (each upload also has its own counter).
    pub sent: Arc<AtomicU64>,
}

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("failed to connect to {0}: {1}")]
    Connect(String, String),
    #[error("TLS handshake with {0} failed: {1}")]
    Tls(String, String),
    #[error("request to {0} failed: {1}")]
    Http(String, String),
    #[error("no progress for {0}s")]
    Idle(u64),
}

pub struct Settings {
    pub urls: Vec<String>,
    pub tls: rustls::ClientConfig,
    pub token: Option<String>,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub bandwidth_limit_mbps: f64,
    /// `X-Cis490-Host-Commit` until [`Transport::set_host_commit`] says otherwise.
    pub host_commit: Option<String>,
}

impl Transport {
    pub fn new(s: Settings) -> Result<Transport, String> {
        let endpoints = s
            .urls
            .iter()
            .map(|u| Endpoint::parse(u))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Transport {
            endpoints,
            tls: Arc::new(s.tls),
            token: s.token,
            connect_timeout: s.connect_timeout,
            idle_timeout: s.idle_timeout,
            limiter: (s.bandwidth_limit_mbps > 0.0)
                .then(|| Arc::new(RateLimiter::new(s.bandwidth_limit_mbps * 1_000_000.0 / 8.0))),
            current: AtomicUsize::new(0),
            fell_back_at: Mutex::new(None),
            pool: Mutex::new(Vec::new()),
            host_commit: ArcSwapOption::from(s.host_commit.map(Arc::new)),
            sent: Arc::new(AtomicU64::new(0)),
        })
    }

    /// The install checkout's HEAD that requests carry from now on (`None`: no header).
    pub fn set_host_commit(&self, commit: Option<String>) {
        self.host_commit.store(commit.map(Arc::new));
    }

    /// The install checkout's HEAD that requests carry.
    pub fn host_commit(&self) -> Option<Arc<String>> {
        self.host_commit.load_full()
    }

    fn endpoint_index(&self) -> usize {
        let mut fb = self.fell_back_at.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = *fb {
            if t.elapsed() >= FALLBACK_RESET {
                *fb = None;
                self.current.store(0, Ordering::Relaxed);
            }
        }
        self.current.load(Ordering::Relaxed) % self.endpoints.len()
    }

    /// After a transient failure on endpoint `i`, the next attempt goes to the next URL.
    fn advance(&self, i: usize) {
        if self.endpoints.len() > 1 {
            let next = (i + 1) % self.endpoints.len();
            if self
                .current
                .compare_exchange(i, next, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
            {
                tracing::warn!(
                    from = %self.endpoints[i].authority(),
                    to = %self.endpoints[next].authority(),
                    "switching to the next receiver URL"
                );
                *self.fell_back_at.lock().unwrap_or_else(|p| p.into_inner()) =
                    (next != 0).then(Instant::now);
            }
        }
    }

    async fn connect(&self, i: usize) -> Result<Sender, NetError> {
        let ep = &self.endpoints[i];
        let auth = ep.authority();
        let tcp = tokio::time::timeout(
            self.connect_timeout,
            tokio::net::TcpStream::connect((ep.host.as_str(), ep.port)),
        )
        .await
        .map_err(|_| NetError::Connect(auth.clone(), "timed out".into()))?
        .map_err(|e| NetError::Connect(auth.clone(), e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from(ep.host.clone())
            .map_err(|e| NetError::Tls(auth.clone(), e.to_string()))?;
        let tls = tokio::time::timeout(
            self.connect_timeout,
            TlsConnector::from(self.tls.clone()).connect(name, tcp),
        )
        .await
        .map_err(|_| NetError::Tls(auth.clone(), "timed out".into()))?
        .map_err(|e| NetError::Tls(auth.clone(), e.to_string()))?;
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| NetError::Http(auth.clone(), e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(send)
    }

    async fn sender(&self, i: usize) -> Result<Sender, NetError> {
        loop {
            let pooled = {
                let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
                pool.iter()
                    .position(|(j, _)| *j == i)
                    .map(|k| pool.swap_remove(k).1)
            };
            match pooled {
                Some(mut s) => {
                    if s.ready().await.is_ok() {
                        return Ok(s);
                    }
                }
                None => return self.connect(i).await,
            }
        }
    }

    fn give_back(&self, i: usize, s: Sender) {
        if !s.is_closed() {
            let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
            if pool.len() < 16 {
                pool.push((i, s));
            }
        }
    }

    fn request(
        &self,
        ep: &Endpoint,
        method: &str,
        path: &str,
        extra: &[(&str, String)],
        body: UploadBody,
    ) -> Result<http::Request<UploadBody>, NetError> {
        let mut b = http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", ep.prefix))
            .header("host", ep.authority())
            .header(
                "user-agent",
                concat!("cis490-shipper/", env!("CARGO_PKG_VERSION")),
            );
        if let Some(c) = self.host_commit.load().as_deref() {
            b = b.header(headers::HOST_COMMIT, c.as_str());
        }
        if let Some(t) = &self.token {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        for (k, v) in extra {
            b = b.header(*k, v);
        }
        b.body(body)
            .map_err(|e| NetError::Http(ep.authority(), e.to_string()))
    }

    /// Sends one request and reads the whole (small, JSON) answer, abandoning it when nothing
    /// moves for `idle_timeout`.
    async fn exchange(
        &self,
        i: usize,
        method: &str,
        path: &str,
        extra: &[(&str, String)],
        body: UploadBody,
        progress: &AtomicU64,
    ) -> Result<(u16, http::HeaderMap, Option<Value>), NetError> {
        let ep = self.endpoints[i].clone();
        let req = self.request(&ep, method, path, extra, body)?;
        let work = async {
            let mut s = self.sender(i).await?;
            let resp = s
                .send_request(req)
                .await
                .map_err(|e| NetError::Http(ep.authority(), e.to_string()))?;
            let status = resp.status().as_u16();
            let headers = resp.headers().clone();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| NetError::Http(ep.authority(), e.to_string()))?
                .to_bytes();
            self.give_back(i, s);
            let json = serde_json::from_slice(&bytes).ok();
            Ok((status, headers, json))
        };
        let idle = async {
            let mut last = progress.load(Ordering::Relaxed);
            let mut since = Instant::now();
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                let now = progress.load(Ordering::Relaxed);
                if now != last {
                    last = now;
                    since = Instant::now();
                } else if since.elapsed() >= self.idle_timeout {
                    return NetError::Idle(self.idle_timeout.as_secs());
                }
            }
        };
        tokio::select! {
            r = work => r,
            e = idle => Err(e),
        }
    }

    fn net_outcome(&self, i: usize, e: NetError) -> Outcome {
        self.advance(i);
        Outcome::Transient {
            detail: e.to_string(),
            retry_after: None,
        }
    }

    /// Ships one episode; on a transient failure the next URL is tried at once, so one attempt
    /// covers every configured receiver.
    pub async fn ship(&self, s: &Shipment) -> Outcome {
        let n = self.endpoints.len();
        let mut outcome = self.ship_to(self.endpoint_index(), s).await;
        for _ in 1..n {
            if !matches!(outcome, Outcome::Transient { .. }) {
                break;
            }
            outcome = self.ship_to(self.endpoint_index(), s).await;
        }
        outcome
    }

    /// Preflight for big tarballs, then the streamed PUT, against endpoint `i`.
    async fn ship_to(&self, i: usize, s: &Shipment) -> Outcome {
        // A new attempt is progress: the watchdog's window restarts per receiver URL tried.
        s.progress.fetch_add(1, Ordering::Relaxed);
        let path = format!("/v1/episodes/{}/{}", s.host_id, s.episode_id);
        let mut hdrs = vec![
            (headers::CODE_COMMIT, s.commit.clone()),
            (headers::TAR_SHA256, s.tar_sha256.clone()),
            ("content-type", headers::CONTENT_TYPE_ZSTD.to_string()),
        ];
        let len = s.tarball.len();
        if len > CHECK_THRESHOLD {
            let mut h = hdrs.clone();
            h.push((headers::UPLOAD_LENGTH, len.to_string()));
            match self
                .exchange(
                    i,
                    "POST",
                    &format!("{path}/check"),
                    &h,
                    UploadBody::empty(),
                    &s.progress,
                )
                .await
            {
                Ok((204, _, _)) => {}
                Ok((status, headers, body)) => {
                    let ra =
                        parse_retry_after(headers.get("retry-after").and_then(|v| v.to_str().ok()));
                    let o = classify(status, body, ra);
                    if matches!(o, Outcome::Transient { .. }) {
                        self.advance(i);
                    }
                    return o;
                }
                Err(e) => return self.net_outcome(i, e),
            }
        }
        let source: Box<dyn AsyncRead + Send + Unpin> = match &s.tarball {
            crate::queue::Tarball::Memory(b) => Box::new(std::io::Cursor::new(b.clone())),
            crate::queue::Tarball::File { path, .. } => match tokio::fs::File::open(path).await {
                Ok(f) => Box::new(f),
                Err(e) => {
                    return Outcome::Transient {
                        detail: format!("failed to open {}: {e}", path.display()),
                        retry_after: None,
                    };
                }
            },
        };
        hdrs.push(("content-length", len.to_string()));
        let body = UploadBody::file(
            source,
            len,
            vec![s.progress.clone(), self.sent.clone()],
            self.limiter.clone(),
        );
        match self
            .exchange(i, "PUT", &path, &hdrs, body, &s.progress)
            .await
        {
            Ok((status, headers, body)) => {
                let ra =
                    parse_retry_after(headers.get("retry-after").and_then(|v| v.to_str().ok()));
                let o = classify(status, body, ra);
                if matches!(o, Outcome::Transient { .. }) {
                    self.advance(i);
                }
                o
            }
            Err(e) => self.net_outcome(i, e),
        }
    }

    /// `POST /v1/ping`, optionally asking about `commit`.
    pub async fn ping(&self, commit: Option<&str>) -> Result<(u16, Option<Value>), NetError> {
        self.ping_at(self.endpoint_index(), commit).await
    }

    /// `POST /v1/ping` to the receiver at position `i` of the URL list (no failover).
    pub async fn ping_at(
        &self,
        i: usize,
        commit: Option<&str>,
    ) -> Result<(u16, Option<Value>), NetError> {
        let mut h = Vec::new();
        if let Some(c) = commit {
            h.push((headers::CODE_COMMIT, c.to_string()));
        }
        let (status, _, body) = self
            .exchange(
                i,
                "POST",
                "/v1/ping",
                &h,
                UploadBody::empty(),
                &AtomicU64::new(0),
            )
            .await?;
        Ok((status, body))
    }

    pub fn endpoints(&self) -> &[Endpoint] {
        &self.endpoints
    }
}

/// A request body: nothing, a small buffer, or a file streamed in chunks with progress counting
/// and an optional rate limit.
pub struct UploadBody {
    inner: BodyKind,
}

enum BodyKind {
    Empty(Empty<Bytes>),
    Full(Full<Bytes>),
    File(Box<FileState>),
}

struct FileState {
    file: Box<dyn AsyncRead + Send + Unpin>,
    remaining: u64,
    counters: Vec<Arc<AtomicU64>>,
    limiter: Option<Arc<RateLimiter>>,
    /// A chunk read but held back until the limiter's wait is over.
    held: Option<Bytes>,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// A token bucket shared by every upload of the process, so `bandwidth_limit_mbps` caps the
/// host's total; at most one second of unused rate is saved up as a burst.
pub struct RateLimiter {
    rate: f64,
    state: Mutex<(f64, Instant)>,
}

impl RateLimiter {
    pub fn new(bytes_per_sec: f64) -> Self {
        RateLimiter {
            rate: bytes_per_sec,
            state: Mutex::new((bytes_per_sec, Instant::now())),
        }
    }

    /// Takes `n` bytes' worth of tokens; returns how long to wait before sending them.
    pub fn reserve(&self, n: u64, now: Instant) -> Duration {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let elapsed = now.saturating_duration_since(st.1).as_secs_f64();
        st.0 = (st.0 + elapsed * self.rate).min(self.rate);
        st.1 = now;
        st.0 -= n as f64;
        if st.0 >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-st.0 / self.rate)
        }
    }
}

const CHUNK: usize = 256 * 1024;

impl UploadBody {
    pub fn empty() -> Self {
        UploadBody {
            inner: BodyKind::Empty(Empty::new()),
        }
    }

    pub fn bytes(b: Bytes) -> Self {
        UploadBody {
            inner: BodyKind::Full(Full::new(b)),
        }
    }

    pub fn file(
        file: Box<dyn AsyncRead + Send + Unpin>,
        len: u64,
        counters: Vec<Arc<AtomicU64>>,
        limiter: Option<Arc<RateLimiter>>,
    ) -> Self {
        UploadBody {
            inner: BodyKind::File(Box::new(FileState {
                file,
                remaining: len,
                counters,
                limiter,
                held: None,
                sleep: None,
            })),
        }
    }
}

impl http_body::Body for UploadBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match &mut self.get_mut().inner {
            BodyKind::Empty(e) => Pin::new(e).poll_frame(cx).map_err(|never| match never {}),
            BodyKind::Full(f) => Pin::new(f).poll_frame(cx).map_err(|never| match never {}),
            BodyKind::File(st) => st.poll_chunk(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            BodyKind::Empty(_) => true,
            BodyKind::Full(f) => f.is_end_stream(),
            BodyKind::File(st) => st.remaining == 0,
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match &self.inner {
            BodyKind::Empty(_) => http_body::SizeHint::with_exact(0),
            BodyKind::Full(f) => f.size_hint(),
            BodyKind::File(st) => http_body::SizeHint::with_exact(st.remaining),
        }
    }
}

impl FileState {
    fn count(&self, n: usize) {
        for c in &self.counters {
            c.fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    fn poll_chunk(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        if let Some(sleep) = self.sleep.as_mut() {
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.sleep = None;
        }
        if let Some(chunk) = self.held.take() {
            self.count(chunk.len());
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let want = (self.remaining as usize).min(CHUNK);
        let mut buf = BytesMut::zeroed(want);
        let mut rb = ReadBuf::new(&mut buf);
        match Pin::new(&mut self.file).poll_read(cx, &mut rb) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e))),
            Poll::Ready(Ok(())) => {
                let n = rb.filled().len();
                if n == 0 {
                    return Poll::Ready(Some(Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "tarball shrank while it was being sent",
                    ))));
                }
                buf.truncate(n);
                self.remaining -= n as u64;
                let chunk = buf.freeze();
                let wait = self
                    .limiter
                    .as_ref()
                    .map_or(Duration::ZERO, |l| l.reserve(n as u64, Instant::now()));
                if wait.is_zero() {
                    self.count(n);
                    return Poll::Ready(Some(Ok(Frame::data(chunk))));
                }
                self.held = Some(chunk);
                self.sleep = Some(Box::pin(tokio::time::sleep(wait)));
                self.poll_chunk(cx)
            }
        }
    }
}

use std::future::Future as _;

#[cfg(test)]
mod tests {
    use super::*;

    fn transport(host_commit: Option<&str>) -> Transport {
        let tls = rustls::ClientConfig::builder_with_provider(cis490_common::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        Transport::new(Settings {
            urls: vec!["https://r.lab:8443".into()],
            tls,
            token: None,
            connect_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(1),
            bandwidth_limit_mbps: 0.0,
            host_commit: host_commit.map(str::to_string),
        })
        .unwrap()
    }

    #[test]
    fn requests_carry_the_install_head_while_there_is_one() {
        const A: &str = "0123456789abcdef0123456789abcdef01234567";
        const B: &str = "89abcdef0123456789abcdef0123456789abcdef";
        let header = |t: &Transport| {
            let ep = t.endpoints()[0].clone();
            let req = t
                .request(&ep, "POST", "/v1/ping", &[], UploadBody::empty())
                .unwrap();
            assert_eq!(
                req.headers()["user-agent"],
                concat!("cis490-shipper/", env!("CARGO_PKG_VERSION"))
            );
            req.headers()
                .get(headers::HOST_COMMIT)
                .map(|v| v.to_str().unwrap().to_string())
        };
        let t = transport(Some(A));
        assert_eq!(header(&t).as_deref(), Some(A));
        t.set_host_commit(Some(B.into()));
        assert_eq!(
            header(&t).as_deref(),
            Some(B),
            "a new HEAD without a restart"
        );
        t.set_host_commit(None);
        assert_eq!(header(&t), None, "no checkout, no header");
        assert_eq!(header(&transport(None)), None);
    }

    #[test]
    fn endpoints_parse() {
        assert_eq!(
            Endpoint::parse("https://r.lab:8443").unwrap(),
            Endpoint {
                host: "r.lab".into(),
                port: 8443,
                prefix: String::new()
            }
        );
        assert_eq!(
            Endpoint::parse("https://r.lab/base/").unwrap().prefix,
            "/base"
        );
        assert_eq!(Endpoint::parse("https://r.lab").unwrap().port, 443);
        assert_eq!(Endpoint::parse("https://[::1]:9").unwrap().host, "::1");
        assert!(Endpoint::parse("http://r.lab").is_err());
        assert!(Endpoint::parse("https://:80").is_err());
        assert!(Endpoint::parse("https://r:x").is_err());
    }

    #[test]
    fn the_limiter_paces_to_its_rate_with_a_one_second_burst() {
        let l = RateLimiter::new(1000.0);
        let t0 = Instant::now();
        assert_eq!(l.reserve(1000, t0), Duration::ZERO, "one second of burst");
        assert_eq!(l.reserve(500, t0), Duration::from_millis(500));
        // Half a second later the debt is paid; 250 more bytes cost 250 ms.
        assert_eq!(
            l.reserve(250, t0 + Duration::from_millis(500)),
            Duration::from_millis(250)
        );
        // Idle for an hour: still only one second of burst.
        let later = t0 + Duration::from_secs(3600);
        assert_eq!(l.reserve(1000, later), Duration::ZERO);
        assert_eq!(l.reserve(1000, later), Duration::from_secs(1));
    }

    #[test]
    fn statuses_map_to_the_spec_table() {
        let reason = |s| match classify(s, None, None) {
            Outcome::Fatal { reason, .. } => reason.as_str(),
            Outcome::Stored { .. } => "stored",
            Outcome::Auth { .. } => "auth",
            Outcome::Transient { .. } => "transient",
        };
        assert_eq!(reason(201), "stored");
        assert_eq!(reason(200), "stored");
        assert_eq!(reason(400), "malformed_request");
        assert_eq!(reason(411), "malformed_request");
        assert_eq!(reason(409), "conflict");
        assert_eq!(reason(412), "commit_not_in_window");
        assert_eq!(reason(413), "too_large");
        assert_eq!(reason(422), "invalid_content");
        assert_eq!(reason(401), "auth");
        assert_eq!(reason(403), "auth");
        for s in [429, 500, 502, 503, 504, 507, 404, 408] {
            assert_eq!(reason(s), "transient", "{s}");
        }
        assert_eq!(parse_retry_after(Some(" 7 ")), Some(Duration::from_secs(7)));
        assert_eq!(
            parse_retry_after(Some("Wed, 21 Oct 2015 07:28:00 GMT")),
            None
        );
    }
}
