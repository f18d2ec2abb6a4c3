//! Talking to the receiver: mutual TLS with hyper over kept-alive HTTP/1.1 connections, the
//! preflight `check`, the streamed PUT, and the mapping of every answer to what the queue does.

use std::io::Read;
use std::path::Path;
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
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, ReadBuf};
use tokio_rustls::TlsConnector;

use cis490_common::{headers, Disposition, Reason};

use crate::queue::Tarball;

/// Tarballs above this size get a preflight `check` before their bytes are sent (SPEC §3).
pub const CHECK_THRESHOLD: u64 = 1 << 20;
/// After falling back to a later URL, the first is tried again after this long.
pub const FALLBACK_RESET: Duration = Duration::from_secs(300);
pub use cis490_common::headers::{RESUME_OFFSET, RESUME_PREFIX_SHA256};
/// A 416 makes the PUT go again at once from the receiver's offset at most this many times per
/// attempt; one more 416 ends the attempt as transient (backoff), so a receiver that keeps
/// losing its prefix cannot keep the shipper in a tight loop.
pub const RESUME_RESENDS: u32 = 2;

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

/// The offset a `check` 204 or a 416 names, as a place to send a body of `len` bytes from: 0
/// (the whole body) unless the header is a plain decimal number strictly between 0 and `len`.
/// A value the shipper cannot use is never an error: sending everything is always allowed.
pub fn parse_resume_offset(v: Option<&str>, len: u64) -> u64 {
    v.map(str::trim)
        // `u64::from_str` takes a leading `+`; the header is digits only.
        .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|s| s.parse::<u64>().ok())
        .filter(|&n| n < len)
        .unwrap_or(0)
}

/// `Content-Range` of a PUT that sends bytes `offset..len` of a `len`-byte body.
pub fn content_range(offset: u64, len: u64) -> String {
    format!("bytes {offset}-{}/{len}", len.saturating_sub(1))
}

/// What a PUT's answer leads to.
#[derive(Debug)]
pub enum AfterPut {
    /// 416: the receiver cannot continue from where this PUT started; send again from `offset`
    /// (0: the whole body, an ordinary PUT).
    Resend { offset: u64 },
    /// Anything else, or a 416 once the resends are used up: the attempt ends here.
    Done(Outcome),
}

/// Decides what a PUT's answer means. `sent_from` is where that PUT's body started and
/// `resends` how many 416s this attempt has already followed. A 416 is never a refusal of the
/// episode: it is followed at once up to [`RESUME_RESENDS`] times, then it is transient.
pub fn after_put(
    status: u16,
    answer_headers: &http::HeaderMap,
    body: Option<Value>,
    len: u64,
    sent_from: u64,
    resends: u32,
) -> AfterPut {
    let header = |name: &str| answer_headers.get(name).and_then(|v| v.to_str().ok());
    if status == 416 && resends < RESUME_RESENDS {
        let offset = parse_resume_offset(header(RESUME_OFFSET), len);
        // The receiver holds exactly what this PUT skipped, yet refused it: the prefix it holds
        // differs from this tarball's, so continuing from there cannot work.
        let offset = if offset == sent_from { 0 } else { offset };
        return AfterPut::Resend { offset };
    }
    // Past the resends a 416 falls through to the table, where it is transient like any other
    // status the table does not name.
    AfterPut::Done(classify(
        status,
        body,
        parse_retry_after(header("retry-after")),
    ))
}

/// The SHA-256 (lowercase hex) of the next `n` bytes of `r`, read in 256 KiB pieces (`CHUNK`) so a
/// prefix of any size costs one buffer; `progress` moves once per piece, so an upload whose
/// long prefix is being hashed is not taken for a stalled one. Fails if `r` ends before `n`.
pub fn prefix_sha256(r: &mut impl Read, n: u64, progress: &AtomicU64) -> std::io::Result<String> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut left = n;
    while left > 0 {
        let want = usize::try_from(left).map_or(CHUNK, |l| l.min(CHUNK));
        let got = match r.read(&mut buf[..want]) {
            Ok(0) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("the tarball ended {left} bytes before the resume offset {n}"),
                ))
            }
            Ok(got) => got,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..got]);
        left -= got as u64;
        progress.fetch_add(1, Ordering::Relaxed);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Opens the outbox tarball at `path` for a PUT from `offset`: checks it is still `len` bytes
/// long, hashes its first `offset` bytes and returns the file positioned right after them, so
/// the prefix hash and the bytes sent come from one open file. Blocking: run it off the async
/// threads.
fn open_past_prefix(
    path: &Path,
    len: u64,
    offset: u64,
    progress: &AtomicU64,
) -> std::io::Result<(std::fs::File, String)> {
    let mut f = std::fs::File::open(path)?;
    let on_disk = f.metadata()?.len();
    if on_disk != len {
        return Err(std::io::Error::other(format!(
            "the tarball is {on_disk} bytes, {len} were expected"
        )));
    }
    let sha = prefix_sha256(&mut f, offset, progress)?;
    Ok((f, sha))
}

/// A PUT's body source: the tarball from some offset to its end.
struct BodyFrom {
    source: Box<dyn AsyncRead + Send + Unpin>,
    /// The SHA-256 of the bytes before the offset (`None` for a whole body).
    prefix_sha256: Option<String>,
}

/// Opens `tarball` to be sent from `offset` (< its length). An outbox file's prefix is hashed on
/// a blocking thread; an in-memory tarball (at most 1 MiB, never offered a resume by a receiver
/// that follows SPEC §13) is hashed in place.
async fn body_from(
    tarball: &Tarball,
    offset: u64,
    progress: &Arc<AtomicU64>,
) -> Result<BodyFrom, String> {
    match tarball {
        Tarball::Memory(b) => {
            let start = usize::try_from(offset)
                .ok()
                .filter(|&o| o <= b.len())
                .ok_or_else(|| format!("resume offset {offset} is past the tarball's end"))?;
            Ok(BodyFrom {
                source: Box::new(std::io::Cursor::new(b.slice(start..))),
                prefix_sha256: (start > 0).then(|| hex::encode(Sha256::digest(&b[..start]))),
            })
        }
        Tarball::File { path, .. } if offset == 0 => match tokio::fs::File::open(path).await {
            Ok(f) => Ok(BodyFrom {
                source: Box::new(f),
                prefix_sha256: None,
            }),
            Err(e) => Err(format!("failed to open {}: {e}", path.display())),
        },
        Tarball::File { path, len } => {
            let (p, len, progress) = (path.clone(), *len, progress.clone());
            let opened =
                tokio::task::spawn_blocking(move || open_past_prefix(&p, len, offset, &progress))
                    .await;
            match opened {
                Ok(Ok((f, sha))) => Ok(BodyFrom {
                    source: Box::new(tokio::fs::File::from_std(f)),
                    prefix_sha256: Some(sha),
                }),
                Ok(Err(e)) => Err(format!(
                    "failed to read the first {offset} bytes of {}: {e}",
                    path.display()
                )),
                Err(e) => Err(format!("prefix hashing task failed: {e}")),
            }
        }
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
    pub tarball: Tarball,
    /// Body bytes sent for this episode: its idle timer and the watchdog watch it. It also moves
    /// once per new request and per piece of a resume prefix hashed, so it only ever says
    /// "something happened", never how much was sent.
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
    /// covers every configured receiver. `on_resume(offset)` is called just before a PUT is
    /// sent from `offset` > 0 (SPEC §13), for the log and the metrics.
    pub async fn ship(&self, s: &Shipment, on_resume: &(dyn Fn(u64) + Sync)) -> Outcome {
        let n = self.endpoints.len();
        let mut outcome = self.ship_to(self.endpoint_index(), s, on_resume).await;
        for _ in 1..n {
            if !matches!(outcome, Outcome::Transient { .. }) {
                break;
            }
            outcome = self.ship_to(self.endpoint_index(), s, on_resume).await;
        }
        outcome
    }

    /// Preflight for big tarballs (which also learns how much of the body the receiver already
    /// holds), then the streamed PUT from there, against endpoint `i`.
    async fn ship_to(&self, i: usize, s: &Shipment, on_resume: &(dyn Fn(u64) + Sync)) -> Outcome {
        // A new attempt is progress: the watchdog's window restarts per receiver URL tried.
        s.progress.fetch_add(1, Ordering::Relaxed);
        let path = format!("/v1/episodes/{}/{}", s.host_id, s.episode_id);
        let hdrs = vec![
            (headers::CODE_COMMIT, s.commit.clone()),
            (headers::TAR_SHA256, s.tar_sha256.clone()),
            ("content-type", headers::CONTENT_TYPE_ZSTD.to_string()),
        ];
        let len = s.tarball.len();
        let mut offset = 0;
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
                Ok((204, headers, _)) => {
                    offset = parse_resume_offset(
                        headers.get(RESUME_OFFSET).and_then(|v| v.to_str().ok()),
                        len,
                    );
                }
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
        let mut resends = 0;
        loop {
            let (status, headers, body) =
                match self.put(i, s, &path, &hdrs, offset, on_resume).await {
                    Ok(answer) => answer,
                    Err(o) => return o,
                };
            match after_put(status, &headers, body, len, offset, resends) {
                AfterPut::Resend { offset: next } => {
                    tracing::info!(
                        episode = %s.episode_id,
                        refused_offset = offset,
                        offset = next,
                        "the receiver cannot continue the upload from there; sending again from its offset"
                    );
                    resends += 1;
                    offset = next;
                    s.progress.fetch_add(1, Ordering::Relaxed);
                }
                AfterPut::Done(o) => {
                    if matches!(o, Outcome::Transient { .. }) {
                        self.advance(i);
                    }
                    return o;
                }
            }
        }
    }

    /// One PUT of the tarball's bytes `offset..` to endpoint `i`: a whole body at 0, else a
    /// resumed one with `Content-Range` and the prefix's SHA-256. The idle timer, the progress
    /// counters and the bandwidth limit cover its body exactly as they cover a whole one.
    async fn put(
        &self,
        i: usize,
        s: &Shipment,
        path: &str,
        hdrs: &[(&'static str, String)],
        offset: u64,
        on_resume: &(dyn Fn(u64) + Sync),
    ) -> Result<(u16, http::HeaderMap, Option<Value>), Outcome> {
        let len = s.tarball.len();
        // Invariant: every offset here came through `parse_resume_offset`, so it is below `len`.
        let rest = len.saturating_sub(offset);
        let from = body_from(&s.tarball, offset, &s.progress)
            .await
            .map_err(|detail| Outcome::Transient {
                detail,
                retry_after: None,
            })?;
        let mut h = hdrs.to_vec();
        h.push(("content-length", rest.to_string()));
        if let Some(sha) = from.prefix_sha256 {
            h.push(("content-range", content_range(offset, len)));
            h.push((RESUME_PREFIX_SHA256, sha));
            on_resume(offset);
        }
        let body = UploadBody::file(
            from.source,
            rest,
            vec![s.progress.clone(), self.sent.clone()],
            self.limiter.clone(),
        );
        self.exchange(i, "PUT", path, &h, body, &s.progress)
            .await
            .map_err(|e| self.net_outcome(i, e))
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

    use crate::test_bytes::noise;

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

    #[test]
    fn a_resume_offset_is_used_only_when_it_is_inside_the_body() {
        let len = 10 << 20;
        assert_eq!(parse_resume_offset(None, len), 0, "absent: from zero");
        assert_eq!(parse_resume_offset(Some("0"), len), 0);
        assert_eq!(parse_resume_offset(Some("8388608"), len), 8 << 20);
        assert_eq!(parse_resume_offset(Some(" 42 "), len), 42);
        for garbage in [
            "",
            "-5",
            "+5",
            "1e6",
            "0x10",
            "12 34",
            "abc",
            "99999999999999999999999",
        ] {
            assert_eq!(parse_resume_offset(Some(garbage), len), 0, "{garbage:?}");
        }
        assert_eq!(parse_resume_offset(Some(&len.to_string()), len), 0, "N = L");
        assert_eq!(
            parse_resume_offset(Some(&(len + 1).to_string()), len),
            0,
            "N > L"
        );
        assert_eq!(
            parse_resume_offset(Some(&(len - 1).to_string()), len),
            len - 1
        );
        assert_eq!(
            parse_resume_offset(Some("1"), 0),
            0,
            "an empty body has no inside"
        );
    }

    #[test]
    fn content_range_names_the_bytes_sent_and_the_whole_length() {
        assert_eq!(content_range(8, 10), "bytes 8-9/10");
        assert_eq!(content_range(0, 1), "bytes 0-0/1");
        assert_eq!(
            content_range(8 << 20, 3 << 30),
            format!("bytes {}-{}/{}", 8 << 20, (3u64 << 30) - 1, 3u64 << 30)
        );
    }

    #[test]
    fn the_prefix_hash_covers_exactly_the_bytes_before_the_offset() {
        let data = noise(3 * CHUNK + 123);
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("ep.tar.zst");
        std::fs::write(&path, &data).unwrap();
        let len = data.len() as u64;
        for n in [1, CHUNK - 1, CHUNK, 2 * CHUNK + 7, data.len() - 1] {
            let progress = AtomicU64::new(0);
            let (mut f, sha) = open_past_prefix(&path, len, n as u64, &progress).unwrap();
            assert_eq!(
                sha,
                hex::encode(Sha256::digest(&data[..n])),
                "prefix of {n}"
            );
            assert!(
                progress.load(Ordering::Relaxed) >= 1,
                "hashing counts as progress"
            );
            let mut rest = Vec::new();
            f.read_to_end(&mut rest).unwrap();
            assert_eq!(rest, &data[n..], "the file is left right after the prefix");
        }
        // Hashing a long prefix moves the progress counter piece by piece.
        let progress = AtomicU64::new(0);
        open_past_prefix(&path, len, 3 * CHUNK as u64, &progress).unwrap();
        assert_eq!(progress.load(Ordering::Relaxed), 3);
        // A tarball that is not the length the attempt knows is not resumed from.
        let e = open_past_prefix(&path, len + 1, 5, &progress).unwrap_err();
        assert!(e.to_string().contains("expected"), "{e}");
        let e = prefix_sha256(&mut &data[..10], 11, &progress).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
    }

    fn answer(status: u16, offset: Option<&str>) -> (u16, http::HeaderMap) {
        let mut h = http::HeaderMap::new();
        if let Some(o) = offset {
            h.insert(RESUME_OFFSET, o.parse().unwrap());
        }
        (status, h)
    }

    #[test]
    fn a_416_is_followed_a_bounded_number_of_times_and_never_quarantines() {
        let len = 100 << 20;
        let body = || Some(serde_json::json!({"error": "resume_unavailable", "message": "gone"}));
        let next = |status, offset: Option<&str>, sent_from, resends| {
            let (status, h) = answer(status, offset);
            after_put(status, &h, body(), len, sent_from, resends)
        };
        let resend = |a: AfterPut| match a {
            AfterPut::Resend { offset } => offset,
            AfterPut::Done(o) => panic!("ended with {o:?}"),
        };
        assert_eq!(
            resend(next(416, Some("0"), 64 << 20, 0)),
            0,
            "holds nothing"
        );
        assert_eq!(resend(next(416, None, 64 << 20, 0)), 0, "no header");
        assert_eq!(resend(next(416, Some("garbage"), 64 << 20, 1)), 0);
        assert_eq!(
            resend(next(416, Some("16777216"), 64 << 20, 0)),
            16 << 20,
            "holds less than before: from its offset"
        );
        assert_eq!(
            resend(next(416, Some("67108864"), 64 << 20, 0)),
            0,
            "refused the very prefix it names: the bytes differ, start over"
        );
        assert_eq!(resend(next(416, Some(&len.to_string()), 64 << 20, 0)), 0);
        // Resends used up: the attempt ends transient, with the receiver's Retry-After.
        let (_, mut h) = answer(416, Some("0"));
        h.insert("retry-after", "9".parse().unwrap());
        match after_put(416, &h, body(), len, 0, RESUME_RESENDS) {
            AfterPut::Done(Outcome::Transient {
                detail,
                retry_after,
            }) => {
                assert!(detail.contains("416 resume_unavailable"), "{detail}");
                assert_eq!(retry_after, Some(Duration::from_secs(9)));
            }
            other => panic!("{other:?}"),
        }
        // Whatever else a resumed PUT gets is the table's, as for a whole one.
        let done = |status| match next(status, Some("5"), 64 << 20, 0) {
            AfterPut::Done(o) => o,
            AfterPut::Resend { .. } => panic!("{status} resent"),
        };
        assert!(matches!(done(201), Outcome::Stored { status: 201, .. }));
        assert!(matches!(done(200), Outcome::Stored { status: 200, .. }));
        assert!(matches!(
            done(422),
            Outcome::Fatal {
                reason: Reason::InvalidContent,
                ..
            }
        ));
        assert!(matches!(done(503), Outcome::Transient { .. }));
        assert!(matches!(done(403), Outcome::Auth { .. }));
        // And the table itself never files a 416 as a refusal.
        assert!(matches!(
            classify(416, body(), None),
            Outcome::Transient { .. }
        ));
        assert_eq!(Disposition::of_status(416), Disposition::Transient);
    }

    /// One request as the scripted receiver saw it.
    struct Seen {
        method: String,
        path: String,
        headers: http::HeaderMap,
        body: Bytes,
    }

    impl Seen {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers.get(name).and_then(|v| v.to_str().ok())
        }
    }

    /// A plain HTTPS server on 127.0.0.1:0 (no client certificate asked) that records every
    /// request with its whole body and answers from `script` in order (500 once it runs out),
    /// and a transport pointed at it.
    async fn scripted_receiver(
        script: Vec<(u16, Option<u64>)>,
    ) -> (Transport, Arc<Mutex<Vec<Seen>>>) {
        paced_receiver(script, 0.0).await
    }

    /// [`scripted_receiver`] with the transport's `bandwidth_limit_mbps` set to `mbps`.
    async fn paced_receiver(
        script: Vec<(u16, Option<u64>)>,
        mbps: f64,
    ) -> (Transport, Arc<Mutex<Vec<Seen>>>) {
        let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
        let cert = ck.cert.der().clone();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into());
        let server = rustls::ServerConfig::builder_with_provider(cis490_common::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let script = Arc::new(Mutex::new(std::collections::VecDeque::from(script)));
        let log = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let Ok(tls) = acceptor.accept(tcp).await else {
                    continue;
                };
                let (log, script) = (log.clone(), script.clone());
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let (log, script) = (log.clone(), script.clone());
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body.collect().await.unwrap().to_bytes();
                            log.lock().unwrap().push(Seen {
                                method: parts.method.to_string(),
                                path: parts.uri.path().to_string(),
                                headers: parts.headers,
                                body,
                            });
                            let (status, offset) =
                                script.lock().unwrap().pop_front().unwrap_or((500, None));
                            let json = match status {
                                416 => r#"{"error":"resume_unavailable","message":"gone"}"#,
                                s if s >= 400 => r#"{"error":"internal","message":"x"}"#,
                                _ => r#"{"status":"stored"}"#,
                            };
                            let mut resp = http::Response::builder().status(status);
                            if let Some(o) = offset {
                                resp = resp.header(RESUME_OFFSET, o.to_string());
                            }
                            Ok::<_, std::convert::Infallible>(
                                resp.body(Full::new(Bytes::from_static(json.as_bytes())))
                                    .unwrap(),
                            )
                        }
                    });
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).unwrap();
        let tls = rustls::ClientConfig::builder_with_provider(cis490_common::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let t = Transport::new(Settings {
            urls: vec![format!("https://127.0.0.1:{port}")],
            tls,
            token: Some("sekrit".into()),
            connect_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(10),
            bandwidth_limit_mbps: mbps,
            host_commit: None,
        })
        .unwrap();
        (t, seen)
    }

    /// A 3 MiB outbox tarball (so `check` is asked) and its shipment.
    fn big_shipment(dir: &Path) -> (Vec<u8>, Shipment) {
        let data = noise(3 * (1 << 20) + 17);
        let path = dir.join("ep1.tar.zst");
        std::fs::write(&path, &data).unwrap();
        let s = Shipment {
            host_id: "h1".into(),
            episode_id: "ep1".into(),
            commit: "0123456789abcdef0123456789abcdef01234567".into(),
            tar_sha256: "ab".repeat(32),
            tarball: Tarball::File {
                path,
                len: data.len() as u64,
            },
            progress: Arc::new(AtomicU64::new(0)),
        };
        (data, s)
    }

    /// Ships `s`, returning the outcome and the offsets `on_resume` was told.
    async fn ship(t: &Transport, s: &Shipment) -> (Outcome, Vec<u64>) {
        let resumed = Mutex::new(Vec::new());
        let o = t
            .ship(s, &|offset| resumed.lock().unwrap().push(offset))
            .await;
        (o, resumed.into_inner().unwrap())
    }

    #[tokio::test]
    async fn a_resumed_put_sends_exactly_the_bytes_after_the_offset() {
        let d = tempfile::tempdir().unwrap();
        let (data, s) = big_shipment(d.path());
        let len = data.len() as u64;
        let n: u64 = (1 << 20) + 5;
        let (t, seen) = scripted_receiver(vec![(204, Some(n)), (201, None)]).await;
        let (o, resumed) = ship(&t, &s).await;
        assert!(matches!(o, Outcome::Stored { status: 201, .. }), "{o:?}");
        assert_eq!(resumed, [n]);
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 2);
        let (check, put) = (&seen[0], &seen[1]);
        assert_eq!(
            (check.method.as_str(), check.path.as_str()),
            ("POST", "/v1/episodes/h1/ep1/check")
        );
        assert_eq!(
            check.header(headers::UPLOAD_LENGTH),
            Some(&*len.to_string())
        );
        assert_eq!(
            (put.method.as_str(), put.path.as_str()),
            ("PUT", "/v1/episodes/h1/ep1")
        );
        assert_eq!(put.body.len() as u64, len - n);
        assert!(
            put.body[..] == data[n as usize..],
            "bytes N..L, nothing else"
        );
        assert_eq!(
            put.header("content-range"),
            Some(&*format!("bytes {n}-{}/{len}", len - 1))
        );
        assert_eq!(put.header("content-length"), Some(&*(len - n).to_string()));
        assert_eq!(
            put.header(RESUME_PREFIX_SHA256),
            Some(&*hex::encode(Sha256::digest(&data[..n as usize])))
        );
        // Every usual header, as on a whole PUT.
        assert_eq!(put.header(headers::CODE_COMMIT), Some(&*s.commit));
        assert_eq!(put.header(headers::TAR_SHA256), Some(&*s.tar_sha256));
        assert_eq!(put.header("content-type"), Some(headers::CONTENT_TYPE_ZSTD));
        assert_eq!(put.header("authorization"), Some("Bearer sekrit"));
        assert_eq!(
            put.header("user-agent"),
            Some(concat!("cis490-shipper/", env!("CARGO_PKG_VERSION")))
        );
        // The resumed part is counted like a whole body (the idle timer and the watchdog read it).
        assert_eq!(t.sent.load(Ordering::Relaxed), len - n);
        assert!(s.progress.load(Ordering::Relaxed) >= len - n);
    }

    #[tokio::test]
    async fn a_416_sends_again_from_the_receivers_offset_down_to_a_whole_put() {
        let d = tempfile::tempdir().unwrap();
        let (data, s) = big_shipment(d.path());
        let len = data.len() as u64;
        let (n, m) = (2u64 << 20, (1u64 << 20) + 3);
        let (t, seen) = scripted_receiver(vec![
            (204, Some(n)),
            (416, Some(m)),
            (416, Some(0)),
            (201, None),
        ])
        .await;
        let (o, resumed) = ship(&t, &s).await;
        assert!(matches!(o, Outcome::Stored { status: 201, .. }), "{o:?}");
        assert_eq!(resumed, [n, m], "the whole PUT is no resume");
        let seen = seen.lock().unwrap();
        let puts: Vec<&Seen> = seen.iter().filter(|r| r.method == "PUT").collect();
        assert_eq!(puts.len(), 3);
        assert!(puts[1].body[..] == data[m as usize..]);
        assert_eq!(
            puts[1].header("content-range"),
            Some(&*content_range(m, len))
        );
        let whole = puts[2];
        assert!(whole.body[..] == data[..], "from zero: the whole tarball");
        assert_eq!(whole.header("content-range"), None);
        assert_eq!(whole.header(RESUME_PREFIX_SHA256), None);
        assert_eq!(whole.header("content-length"), Some(&*len.to_string()));
    }

    #[tokio::test]
    async fn a_receiver_that_keeps_answering_416_makes_the_attempt_transient() {
        let d = tempfile::tempdir().unwrap();
        let (_, s) = big_shipment(d.path());
        let n = 2u64 << 20;
        let (t, seen) = scripted_receiver(vec![
            (204, Some(n)),
            (416, Some(n - 1)),
            (416, Some(n - 2)),
            (416, Some(n - 3)),
            (201, None),
        ])
        .await;
        let (o, resumed) = ship(&t, &s).await;
        match o {
            Outcome::Transient { detail, .. } => {
                assert!(detail.contains("416 resume_unavailable"), "{detail}")
            }
            other => panic!("a 416 must end transient, got {other:?}"),
        }
        assert_eq!(resumed, [n, n - 1, n - 2]);
        assert_eq!(
            seen.lock().unwrap().len(),
            2 + RESUME_RESENDS as usize,
            "check, the PUT and its resends; the next try waits for the backoff"
        );
    }

    #[tokio::test]
    async fn without_an_offset_the_put_is_whole() {
        let d = tempfile::tempdir().unwrap();
        let (data, s) = big_shipment(d.path());
        let (t, seen) = scripted_receiver(vec![(204, None), (201, None)]).await;
        let (o, resumed) = ship(&t, &s).await;
        assert!(matches!(o, Outcome::Stored { .. }), "{o:?}");
        assert!(resumed.is_empty());
        let seen = seen.lock().unwrap();
        assert!(seen[1].body[..] == data[..]);
        assert_eq!(seen[1].header("content-range"), None);
    }

    #[tokio::test]
    async fn the_bandwidth_limit_paces_a_resumed_body() {
        let d = tempfile::tempdir().unwrap();
        let (data, s) = big_shipment(d.path());
        let len = data.len() as u64;
        // 8 Mbit/s is 1 MB/s with a 1 MB burst: the last 1.5 MB take at least half a second.
        let n = len - 1_500_000;
        let (t, seen) = paced_receiver(vec![(204, Some(n)), (201, None)], 8.0).await;
        let started = Instant::now();
        let (o, _) = ship(&t, &s).await;
        assert!(matches!(o, Outcome::Stored { .. }), "{o:?}");
        assert!(
            started.elapsed() >= Duration::from_millis(450),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(seen.lock().unwrap()[1].body.len() as u64, len - n);
    }
}
