//! The S3-compatible store of SPEC §5b: several receivers share one bucket and nothing else.
//!
//! Keys (all under the configured prefix):
//! - `episodes/<host>/<id>/<tar_sha256>.tar.zst`: bodies, content-addressed, so two writers of
//!   one key always write the same episode and no write replaces different bytes. Nothing here
//!   relies on conditional writes (Garage ignores `If-None-Match`).
//! - `index/<host>/<id>.json`: the index row of the episode, written after its body.
//! - `quarantine/<host>/<stamp>-<id>-<rand>.{tar.zst,reason.json}`: rejected uploads.
//! - `health/<instance>`: the writability probe of `/healthz`.
//! - `tmp/resume/...`: resumable multipart uploads and their records (see `resume.rs`).
//!
//! When two different bodies of one id exist (two receivers raced), the episode is the one with
//! the earlier LastModified, then the smaller SHA-256; every reader applies the same rule.

use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use std::collections::BTreeMap;
use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures_util::StreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder, AwsAuthorizer, AwsCredential};
use object_store::client::{HttpClient, HttpConnector, HttpRequestBody, ReqwestConnector};
use object_store::path::Path as Key;
use object_store::{
    Attribute, Attributes, BackoffConfig, ClientOptions, GetOptions, MultipartUpload, ObjectMeta,
    ObjectStore, PutMultipartOptions, PutOptions, PutPayload, RetryConfig,
};
use tokio::runtime::Handle;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use cis490_common::timefmt;

use super::{CommitOutcome, IndexRow, QuarantineNote, StoreUnavailable, Upload};
use crate::ingest::{self, Validated};

mod resume;
mod scrub;
pub(crate) use resume::Held;

/// Bodies up to this size go up in one PUT; larger ones as a multipart upload of parts this
/// big (S3 wants at least 5 MiB for every part but the last). At most one part is in flight
/// while the next one fills, so an upload holds at most two parts in memory.
pub const PART_BYTES: usize = 5 << 20;

/// Body bytes all uploads together may hold in memory (buffers being filled and parts in
/// flight); an upload that would exceed it waits, which slows its sender instead of growing
/// the receiver. Counted in KiB permits.
pub const BUFFER_BUDGET: usize = 64 << 20;

/// How long an upload waits for buffer memory before it is answered 503.
const BUFFER_WAIT: Duration = Duration::from_secs(30);

fn unavailable(op: &str, e: object_store::Error) -> StoreUnavailable {
    StoreUnavailable(format!("{op}: {e}"))
}

pub struct S3Options {
    pub endpoint: String,
    pub region: String,
    pub bucket: String,
    pub prefix: String,
    pub access_key: String,
    pub secret_key: String,
    /// Bound on one store request, retries included.
    pub request_timeout: Duration,
    pub max_uncompressed: u64,
    pub quarantine_keep_days: u64,
    pub quarantine_max_bytes: u64,
    pub quarantine_max_entries: u64,
    /// Names this receiver's health-probe object.
    pub instance: String,
    /// `[limits] resume_keep_s` and `resume_max_bytes` (SPEC §13).
    pub resume_keep_s: u64,
    pub resume_max_bytes: u64,
}

/// Latency and error counts per kind of store request, for `/metrics`.
#[derive(Debug)]
pub struct StoreMetrics {
    requests: Family<OpResult, Counter>,
    latency: Family<OpLabel, Histogram, fn() -> Histogram>,
}

/// Upper bounds (seconds) of the latency histogram buckets.
const BUCKETS: [f64; 10] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpResult {
    op: &'static str,
    result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabel {
    op: &'static str,
}

fn latency_histogram() -> Histogram {
    Histogram::new(BUCKETS)
}

impl Default for StoreMetrics {
    fn default() -> Self {
        StoreMetrics {
            requests: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
        }
    }
}

impl StoreMetrics {
    fn record(&self, op: &'static str, took: Duration, ok: bool) {
        // Both results of an operation are listed from its first request on, so a rate of
        // errors has a zero to start from.
        let (hit, other) = if ok { ("ok", "error") } else { ("error", "ok") };
        self.requests
            .get_or_create(&OpResult { op, result: hit })
            .inc();
        drop(self.requests.get_or_create(&OpResult { op, result: other }));
        self.latency
            .get_or_create(&OpLabel { op })
            .observe(took.as_secs_f64());
    }

    pub(crate) fn encode(&self, enc: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        self.requests.encode(enc.encode_descriptor(
            "cis490_store_requests",
            "Object store requests by operation and result",
            None,
            self.requests.metric_type(),
        )?)?;
        self.latency.encode(enc.encode_descriptor(
            "cis490_store_request_duration_seconds",
            "Object store request latency, retries included",
            None,
            self.latency.metric_type(),
        )?)
    }
}

/// What only the end of an upload knows, kept beside a multipart body.
#[derive(serde::Serialize, serde::Deserialize)]
struct Summary {
    commit: String,
    uncompressed_bytes: u64,
    files: u64,
}

struct Inner {
    os: Arc<AmazonS3>,
    /// Same credentials without the per-request deadline, for streaming whole bodies.
    os_stream: Arc<AmazonS3>,
    prefix: String,
    bucket: String,
    endpoint: String,
    timeout: Duration,
    max_uncompressed: u64,
    keep_days: u64,
    max_quarantine_bytes: u64,
    max_quarantine_entries: u64,
    /// The quarantine as this receiver last listed it, plus what it has added since; trimmed
    /// per rejection without listing the bucket again (SPEC §16). `None` until first listed.
    quarantine_ledger: tokio::sync::Mutex<Option<QuarantineLedger>>,
    instance: String,
    metrics: StoreMetrics,
    quarantine_bytes: AtomicU64,
    buffers: Arc<Semaphore>,
    resume_keep_s: u64,
    resume_max_bytes: u64,
    busy: resume::Busy,
    resumed: AtomicU64,
    resumable_bytes: AtomicU64,
    /// For the one request object_store cannot make: a copy that sets new metadata.
    http: HttpClient,
    credential: AwsCredential,
    region: String,
}

/// The receiver quarantine's entries on the bucket, oldest first, with their total size.
#[derive(Debug, Default)]
struct QuarantineLedger {
    entries: std::collections::VecDeque<(String, SystemTime, u64, Vec<Key>)>,
    bytes: u64,
}

/// An entry's keys and the sibling of each (`.tar.zst` and `.reason.json`), once each.
fn quarantine_pair(keys: &[Key]) -> Vec<Key> {
    let mut out: Vec<Key> = Vec::new();
    for k in keys {
        let name = k.to_string();
        let sibling = name
            .strip_suffix(".tar.zst")
            .map(|b| format!("{b}.reason.json"))
            .or_else(|| {
                name.strip_suffix(".reason.json")
                    .map(|b| format!("{b}.tar.zst"))
            });
        for key in std::iter::once(k.clone()).chain(sibling.map(|s| Key::from(s.as_str()))) {
            if !out.contains(&key) {
                out.push(key);
            }
        }
    }
    out
}

impl QuarantineLedger {
    fn add(&mut self, base: String, when: SystemTime, len: u64, keys: Vec<Key>) {
        self.bytes += len;
        self.entries.push_back((base, when, len, keys));
    }
}

#[derive(Clone)]
pub struct S3Store {
    inner: Arc<Inner>,
}

/// One stored body of an episode, as a listing shows it.
#[derive(Debug, Clone)]
pub struct Body {
    pub key: String,
    pub sha: String,
    pub bytes: u64,
    pub last_modified: SystemTime,
    /// What the store said the object's version was, to see it replaced since it was listed.
    pub e_tag: Option<String>,
}

/// The rule every reader applies when an id has several bodies: earliest first, then by SHA.
fn episode_order(a: &Body, b: &Body) -> std::cmp::Ordering {
    (a.last_modified, &a.sha).cmp(&(b.last_modified, &b.sha))
}

fn meta_attr(name: &'static str, value: String) -> (Attribute, object_store::AttributeValue) {
    (Attribute::Metadata(name.into()), value.into())
}

impl S3Store {
    pub fn new(o: S3Options) -> Result<S3Store, String> {
        let client = ClientOptions::new()
            .with_allow_http(o.endpoint.starts_with("http://"))
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(o.request_timeout);
        let retry = RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(2),
                base: 2.0,
            },
            max_retries: 3,
            retry_timeout: o.request_timeout,
        };
        let build = |client: ClientOptions| {
            AmazonS3Builder::new()
                .with_endpoint(o.endpoint.trim_end_matches('/'))
                .with_region(&o.region)
                .with_bucket_name(&o.bucket)
                .with_access_key_id(&o.access_key)
                .with_secret_access_key(&o.secret_key)
                .with_virtual_hosted_style_request(false)
                .with_client_options(client)
                .with_retry(retry.clone())
                .build()
                .map_err(|e| e.to_string())
        };
        let os = build(client.clone())?;
        let http = ReqwestConnector::default()
            .connect(&client)
            .map_err(|e| e.to_string())?;
        let os_stream = build(client.with_timeout_disabled())?;
        Ok(S3Store {
            inner: Arc::new(Inner {
                os: Arc::new(os),
                os_stream: Arc::new(os_stream),
                prefix: o.prefix,
                bucket: o.bucket,
                endpoint: o.endpoint,
                timeout: o.request_timeout,
                max_uncompressed: o.max_uncompressed,
                keep_days: o.quarantine_keep_days,
                max_quarantine_bytes: o.quarantine_max_bytes,
                max_quarantine_entries: o.quarantine_max_entries,
                quarantine_ledger: tokio::sync::Mutex::new(None),
                instance: o.instance,
                metrics: StoreMetrics::default(),
                quarantine_bytes: AtomicU64::new(0),
                buffers: Arc::new(Semaphore::new(BUFFER_BUDGET / 1024)),
                resume_keep_s: o.resume_keep_s,
                resume_max_bytes: o.resume_max_bytes,
                busy: resume::Busy::default(),
                resumed: AtomicU64::new(0),
                resumable_bytes: AtomicU64::new(0),
                http,
                credential: AwsCredential {
                    key_id: o.access_key,
                    secret_key: o.secret_key,
                    token: None,
                },
                region: o.region,
            }),
        })
    }

    pub fn describe(&self) -> String {
        format!(
            "s3 bucket {:?} at {} (prefix {:?})",
            self.inner.bucket, self.inner.endpoint, self.inner.prefix
        )
    }

    pub fn metrics(&self) -> &StoreMetrics {
        &self.inner.metrics
    }

    fn key(&self, rel: &str) -> Result<Key, StoreUnavailable> {
        Key::parse(format!("{}{rel}", self.inner.prefix))
            .map_err(|e| StoreUnavailable(format!("bad object key {rel:?}: {e}")))
    }

    fn body_key(&self, host: &str, ep: &str, sha: &str) -> Result<Key, StoreUnavailable> {
        self.key(&format!("episodes/{host}/{ep}/{sha}.tar.zst"))
    }

    fn index_key(&self, host: &str, ep: &str) -> Result<Key, StoreUnavailable> {
        self.key(&format!("index/{host}/{ep}.json"))
    }

    /// Runs one store request with the latency/error bookkeeping and an overall deadline.
    async fn timed<T>(
        &self,
        op: &'static str,
        fut: impl std::future::Future<Output = object_store::Result<T>>,
    ) -> Result<T, object_store::Error> {
        let start = Instant::now();
        let r = match tokio::time::timeout(self.inner.timeout + Duration::from_secs(1), fut).await {
            Ok(r) => r,
            Err(_) => Err(object_store::Error::Generic {
                store: "S3",
                source: format!("no answer within {}s", self.inner.timeout.as_secs()).into(),
            }),
        };
        let ok = matches!(r, Ok(_) | Err(object_store::Error::NotFound { .. }));
        self.inner.metrics.record(op, start.elapsed(), ok);
        r
    }

    async fn list(&self, op: &'static str, rel: &str) -> Result<Vec<ObjectMeta>, StoreUnavailable> {
        let prefix = self.key(rel)?;
        let mut s = self.inner.os.list(Some(&prefix));
        let mut out = Vec::new();
        // The deadline is per page of the listing, not for all of it: a large bucket takes
        // many pages, each of which must answer in time.
        loop {
            let page = self
                .timed(op, async {
                    let mut got = Vec::new();
                    while let Some(m) = s.next().await {
                        got.push(m?);
                        if got.len() == 1000 {
                            break;
                        }
                    }
                    Ok(got)
                })
                .await
                .map_err(|e| unavailable(op, e))?;
            let done = page.len() < 1000;
            out.extend(page);
            if done {
                return Ok(out);
            }
        }
    }

    /// Every body stored for an id, in episode order (the first is the episode).
    pub async fn bodies(&self, host: &str, ep: &str) -> Result<Vec<Body>, StoreUnavailable> {
        let metas = self.list("list", &format!("episodes/{host}/{ep}")).await?;
        let mut v: Vec<Body> = metas.into_iter().filter_map(|m| self.body_of(&m)).collect();
        v.sort_by(episode_order);
        Ok(v)
    }

    /// Parses `…episodes/<host>/<id>/<sha>.tar.zst` out of a listing entry.
    fn body_of(&self, m: &ObjectMeta) -> Option<Body> {
        let key = m.location.to_string();
        let name = key.rsplit('/').next()?;
        let sha = name.strip_suffix(".tar.zst")?;
        if sha.len() != 64 || !sha.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return None;
        }
        Some(Body {
            sha: sha.to_string(),
            bytes: m.size,
            last_modified: SystemTime::from(m.last_modified),
            e_tag: m.e_tag.clone(),
            key,
        })
    }

    async fn get_bytes(
        &self,
        op: &'static str,
        key: &Key,
    ) -> Result<Option<Bytes>, StoreUnavailable> {
        let os = self.inner.os.clone();
        let k = key.clone();
        let r = self
            .timed(op, async move { os.get(&k).await?.bytes().await })
            .await;
        match r {
            Ok(b) => Ok(Some(b)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(unavailable(op, e)),
        }
    }

    async fn put(
        &self,
        op: &'static str,
        key: &Key,
        data: Bytes,
        attrs: Attributes,
    ) -> Result<(), StoreUnavailable> {
        let os = self.inner.os.clone();
        let k = key.clone();
        let opts = PutOptions::from(attrs);
        self.timed(op, async move {
            os.put_opts(&k, PutPayload::from(data), opts).await
        })
        .await
        .map(|_| ())
        .map_err(|e| unavailable(op, e))
    }

    async fn delete(&self, key: &Key) -> Result<(), StoreUnavailable> {
        let os = self.inner.os.clone();
        let k = key.clone();
        match self
            .timed("delete", async move { os.delete(&k).await })
            .await
        {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(unavailable("delete", e)),
        }
    }

    /// The stored row of an id, from its index object, else rebuilt from the body (and the
    /// index object written: an episode whose receiver died between body and row gets its row
    /// from the next receiver that looks at it).
    pub async fn find(&self, host: &str, ep: &str) -> Result<Option<IndexRow>, StoreUnavailable> {
        let bodies = self.bodies(host, ep).await?;
        let Some(first) = bodies.first() else {
            return Ok(None);
        };
        let row = self.read_row(host, ep).await?;
        self.row_of_episode(host, ep, first, row).await
    }

    /// Like [`S3Store::find`], but a row whose body is gone, or listed with another length
    /// than the row's `bytes`, counts as no row (SPEC §15) and is logged as `stored_missing`:
    /// the episode is then stored again when its host sends it. The listing `find` makes
    /// anyway gives every body's length, so this costs no request more than `find`.
    pub async fn find_intact(
        &self,
        host: &str,
        ep: &str,
    ) -> Result<Option<IndexRow>, StoreUnavailable> {
        let bodies = self.bodies(host, ep).await?;
        let row = self.read_row(host, ep).await?;
        let Some(row) = row else {
            // No index object: the episode, if any, is its first body at its listed length.
            return match bodies.first() {
                Some(first) => self.row_of_episode(host, ep, first, None).await,
                None => Ok(None),
            };
        };
        let found_bytes = match bodies.first() {
            // The row names another body than the episode's: the row is rebuilt from the body.
            Some(first) if first.sha != row.tar_sha256 => {
                return self.row_of_episode(host, ep, first, Some(row)).await
            }
            Some(first) if first.bytes == row.bytes => return Ok(Some(row)),
            Some(first) => Some(first.bytes),
            None => None,
        };
        tracing::error!(
            event = "stored_missing",
            host_id = %host,
            episode = %ep,
            found_bytes = ?found_bytes,
            indexed_bytes = row.bytes,
            path = %row.path,
            "an indexed episode's body is not in the bucket as indexed; it will be stored again when its host sends it"
        );
        Ok(None)
    }

    /// The row of the episode `first` (the first body in episode order), given the index
    /// object read for the id: that object when it names this body, else one rebuilt from the
    /// body and written back.
    async fn row_of_episode(
        &self,
        host: &str,
        ep: &str,
        first: &Body,
        indexed: Option<IndexRow>,
    ) -> Result<Option<IndexRow>, StoreUnavailable> {
        if let Some(row) = indexed.filter(|r| r.tar_sha256 == first.sha) {
            return Ok(Some(row));
        }
        let row = self.row_from_body(host, ep, first).await?;
        self.write_row(&row).await?;
        tracing::warn!(host = %host, episode = %ep, "wrote the missing index object of a stored episode");
        Ok(Some(row))
    }

    async fn read_row(&self, host: &str, ep: &str) -> Result<Option<IndexRow>, StoreUnavailable> {
        let key = self.index_key(host, ep)?;
        Ok(self
            .get_bytes("get_index", &key)
            .await?
            .and_then(|b| serde_json::from_slice::<IndexRow>(&b).ok()))
    }

    async fn write_row(&self, row: &IndexRow) -> Result<(), StoreUnavailable> {
        let key = self.index_key(&row.host_id, &row.episode_id)?;
        let json = serde_json::to_vec(row).map_err(|e| StoreUnavailable(e.to_string()))?;
        self.put("put_index", &key, Bytes::from(json), Attributes::new())
            .await
    }

    /// Builds a row from a body's object metadata, or by reading the body when the metadata
    /// lacks what only the end of the upload knew (multipart bodies).
    async fn row_from_body(
        &self,
        host: &str,
        ep: &str,
        b: &Body,
    ) -> Result<IndexRow, StoreUnavailable> {
        let key = Key::parse(&b.key).map_err(|e| StoreUnavailable(e.to_string()))?;
        let os = self.inner.os.clone();
        let k = key.clone();
        let head = self
            .timed("head", async move {
                os.get_opts(
                    &k,
                    GetOptions {
                        head: true,
                        ..Default::default()
                    },
                )
                .await
            })
            .await
            .map_err(|e| unavailable("head", e))?;
        let meta = |name: &'static str| {
            head.attributes
                .get(&Attribute::Metadata(name.into()))
                .map(|v| v.as_ref().to_string())
        };
        let parsed = (
            meta("commit"),
            meta("uncompressed-bytes").and_then(|v| v.parse::<u64>().ok()),
            meta("files").and_then(|v| v.parse::<u64>().ok()),
        );
        let (commit, uncompressed, files) = match parsed {
            (Some(c), Some(u), Some(f)) => (c, u, f),
            _ => match self.read_summary(host, ep, &b.sha).await? {
                Some(s) => (s.commit, s.uncompressed_bytes, s.files),
                None => {
                    let v = self.summarize(&key, ep).await?;
                    (v.commit.to_string(), v.uncompressed_bytes, v.files)
                }
            },
        };
        Ok(IndexRow {
            ts: timefmt::rfc3339(b.last_modified),
            host_id: host.to_string(),
            episode_id: ep.to_string(),
            path: b.key.clone(),
            bytes: b.bytes,
            tar_sha256: b.sha.clone(),
            uncompressed_bytes: uncompressed,
            files,
            commit,
        })
    }

    async fn write_summary(
        &self,
        host: &str,
        ep: &str,
        sha: &str,
        s: &Summary,
    ) -> Result<(), StoreUnavailable> {
        let key = self.key(&format!("summaries/{host}/{ep}/{sha}.json"))?;
        let json = serde_json::to_vec(s).map_err(|e| StoreUnavailable(e.to_string()))?;
        self.put("put_summary", &key, Bytes::from(json), Attributes::new())
            .await
    }

    async fn read_summary(
        &self,
        host: &str,
        ep: &str,
        sha: &str,
    ) -> Result<Option<Summary>, StoreUnavailable> {
        let key = self.key(&format!("summaries/{host}/{ep}/{sha}.json"))?;
        Ok(self
            .get_bytes("get_summary", &key)
            .await?
            .and_then(|b| serde_json::from_slice(&b).ok()))
    }

    /// Streams a stored body through the validator (nothing kept) to learn its summary: the
    /// last resort for a body stored without its summary object (e.g. copied in by hand).
    async fn summarize(&self, key: &Key, ep: &str) -> Result<Validated, StoreUnavailable> {
        let Some(reader) = self.open_body(key).await? else {
            return Err(StoreUnavailable(format!("{key} is gone")));
        };
        let ep = ep.to_string();
        let max = self.inner.max_uncompressed;
        let key_s = key.to_string();
        tokio::task::spawn_blocking(move || {
            ingest::summarize_reader(io::BufReader::new(reader), &ep, max)
        })
        .await
        .map_err(|e| StoreUnavailable(e.to_string()))?
        .map_err(|r| StoreUnavailable(format!("{key_s} cannot be summarised: {r}")))
    }

    /// A stored object as a blocking reader (for a blocking thread), or `None` when it is not
    /// there. No overall deadline (a large body takes long); each chunk must arrive within
    /// 30 s, else the read fails.
    async fn open_body(
        &self,
        key: &Key,
    ) -> Result<Option<Box<dyn io::Read + Send>>, StoreUnavailable> {
        let os = self.inner.os_stream.clone();
        let k = key.clone();
        let get = match self.timed("get", async move { os.get(&k).await }).await {
            Ok(g) => g,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(unavailable("get", e)),
        };
        let chunks = get.into_stream();
        let stream = futures_util::stream::unfold(chunks, |mut chunks| async move {
            match tokio::time::timeout(Duration::from_secs(30), chunks.next()).await {
                Ok(Some(r)) => Some((r.map_err(io::Error::other), chunks)),
                Ok(None) => None,
                Err(_) => Some((
                    Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no body bytes for 30s",
                    )),
                    chunks,
                )),
            }
        });
        let reader = tokio_util::io::StreamReader::new(Box::pin(stream));
        Ok(Some(Box::new(tokio_util::io::SyncIoBridge::new(reader))))
    }

    /// `/healthz`: writes this receiver's probe object.
    pub async fn probe(&self) -> Result<(), String> {
        let key = self
            .key(&format!("health/{}", self.inner.instance))
            .map_err(|e| e.to_string())?;
        let now = timefmt::now_rfc3339();
        self.put("put_health", &key, Bytes::from(now), Attributes::new())
            .await
            .map_err(|e| format!("{}: {e}", self.describe()))
    }

    pub fn quarantine_bytes(&self) -> u64 {
        self.inner.quarantine_bytes.load(Ordering::Relaxed)
    }

    /// Quarantine retention (`keep_days`, `max_bytes`), shared by all receivers on the bucket:
    /// each may trim what another wrote. Returns the bytes still held.
    pub async fn clean_quarantine(&self) -> Result<u64, StoreUnavailable> {
        let metas = self.list("list", "quarantine").await?;
        // One entry per upload: its body (if kept) and its reason, grouped by base name.
        let mut entries: BTreeMap<String, (SystemTime, u64, Vec<Key>)> = BTreeMap::new();
        for m in metas {
            let key = m.location.to_string();
            let base = key
                .strip_suffix(".tar.zst")
                .or_else(|| key.strip_suffix(".reason.json"))
                .unwrap_or(&key)
                .to_string();
            let e =
                entries
                    .entry(base)
                    .or_insert((SystemTime::from(m.last_modified), 0, Vec::new()));
            e.0 = e.0.min(SystemTime::from(m.last_modified));
            e.1 += m.size;
            e.2.push(m.location);
        }
        let mut items: Vec<_> = entries.into_iter().collect();
        items.sort_by(|a, b| (a.1 .0, &a.0).cmp(&(b.1 .0, &b.0)));
        let mut ledger = QuarantineLedger::default();
        for (base, (when, len, keys)) in items {
            ledger.add(base, when, len, keys);
        }
        let mut held = self.inner.quarantine_ledger.lock().await;
        *held = Some(ledger);
        self.trim_quarantine(held.as_mut()).await
    }

    /// Takes a new quarantine entry into the ledger and trims it; lists the bucket only the
    /// first time (the janitor's hourly pass brings in what other receivers added).
    async fn quarantine_added(
        &self,
        base: String,
        len: u64,
        keys: Vec<Key>,
    ) -> Result<u64, StoreUnavailable> {
        let mut held = self.inner.quarantine_ledger.lock().await;
        if held.is_none() {
            drop(held);
            return self.clean_quarantine().await;
        }
        if let Some(l) = held.as_mut() {
            l.add(base, SystemTime::now(), len, keys);
        }
        self.trim_quarantine(held.as_mut()).await
    }

    /// Drops expired entries, then the oldest while over `max_bytes` or `max_entries`.
    async fn trim_quarantine(
        &self,
        ledger: Option<&mut QuarantineLedger>,
    ) -> Result<u64, StoreUnavailable> {
        let Some(ledger) = ledger else { return Ok(0) };
        let keep = Duration::from_secs(self.inner.keep_days * 86_400);
        let now = SystemTime::now();
        while let Some((base, when, len, keys)) = ledger.entries.front() {
            let expired =
                self.inner.keep_days > 0 && now.duration_since(*when).unwrap_or_default() > keep;
            let over = (self.inner.max_quarantine_bytes > 0
                && ledger.bytes > self.inner.max_quarantine_bytes)
                || (self.inner.max_quarantine_entries > 0
                    && ledger.entries.len() as u64 > self.inner.max_quarantine_entries);
            if !(expired || over) {
                break;
            }
            // Both objects of the entry go, whichever of them the listing that built the ledger
            // showed: a listing taken while another object was being written may show one of
            // the two, and deleting only that one would leave the other behind for good.
            for k in quarantine_pair(keys) {
                self.delete(&k).await?;
            }
            tracing::info!(event = "cleanup", file = %base, bytes = *len, expired, "removed a receiver quarantine entry from the bucket");
            ledger.bytes -= len;
            ledger.entries.pop_front();
        }
        self.inner
            .quarantine_bytes
            .store(ledger.bytes, Ordering::Relaxed);
        Ok(ledger.bytes)
    }

    /// Decides how a body just stored ends, from what is stored now: if a different body of
    /// this id is there too (two receivers raced with two bodies), the upload is answered 409
    /// and writes no row, whichever body is older. A multipart body's LastModified is its
    /// start, so a body stored and answered 201 meanwhile can be "younger" than this one;
    /// answering 201 here too would retire two different bodies. Both are kept; readers apply
    /// the order rule.
    async fn settle(&self, row: IndexRow) -> Result<CommitOutcome, StoreUnavailable> {
        let bodies = self.bodies(&row.host_id, &row.episode_id).await?;
        match bodies.iter().find(|b| b.sha != row.tar_sha256) {
            Some(other) => {
                let mut seen = row.clone();
                seen.tar_sha256 = other.sha.clone();
                seen.path = other.key.clone();
                seen.bytes = other.bytes;
                Ok(CommitOutcome::Conflict(seen))
            }
            None => {
                self.write_row(&row).await?;
                Ok(CommitOutcome::Stored(row))
            }
        }
    }

    /// Keeps a refused upload in the receiver quarantine: its body when there is one to keep,
    /// and its reason.
    async fn keep_in_quarantine(
        &self,
        note: &QuarantineNote,
        body: QuarantineBody,
    ) -> Result<(), StoreUnavailable> {
        let stamp = humantime::format_rfc3339_seconds(SystemTime::now())
            .to_string()
            .replace([':', '-'], "");
        let base = format!(
            "quarantine/{}/{stamp}-{}-{}",
            note.host_id,
            note.episode_id,
            rand::random::<u32>()
        );
        let mut reason = serde_json::to_value(note).map_err(|e| StoreUnavailable(e.to_string()))?;
        reason["body_kept"] = (!matches!(body, QuarantineBody::None)).into();
        let reason =
            serde_json::to_vec_pretty(&reason).map_err(|e| StoreUnavailable(e.to_string()))?;
        let mut keys = Vec::new();
        let mut len = reason.len() as u64;
        let k = self.key(&format!("{base}.tar.zst"))?;
        match body {
            QuarantineBody::None => {}
            QuarantineBody::Bytes(b) => {
                len += b.len() as u64;
                self.put("put_quarantine", &k, b, Attributes::new()).await?;
                keys.push(k);
            }
            QuarantineBody::Copy(from, bytes) => {
                len += bytes;
                let os = self.inner.os.clone();
                let to = k.clone();
                self.timed("copy_quarantine", async move { os.copy(&from, &to).await })
                    .await
                    .map_err(|e| unavailable("copy_quarantine", e))?;
                keys.push(k);
            }
        }
        let k = self.key(&format!("{base}.reason.json"))?;
        self.put("put_quarantine", &k, Bytes::from(reason), Attributes::new())
            .await?;
        keys.push(k);
        // The upload is kept either way: a failed retention pass is only a warning (the
        // janitor tries again). Accounting is the ledger's, not a listing per rejection
        // (SPEC §16).
        if let Err(e) = self.quarantine_added(base.clone(), len, keys).await {
            tracing::warn!(error = %e, "failed to apply the receiver quarantine retention");
        }
        Ok(())
    }

    /// A server-side copy that gives the copy new user metadata (`x-amz-metadata-directive:
    /// REPLACE`), signed here because object_store's `copy` keeps the source's metadata.
    async fn copy_with_metadata(
        &self,
        from: &Key,
        to: &Key,
        meta: &[(&str, String)],
    ) -> Result<(), StoreUnavailable> {
        let i = &self.inner;
        let url = format!(
            "{}/{}/{}",
            i.endpoint.trim_end_matches('/'),
            encode_segment(&i.bucket),
            encode_key(to)
        );
        let mut b = http::Request::builder()
            .method(http::Method::PUT)
            .uri(&url)
            .header(
                "x-amz-copy-source",
                format!("{}/{}", encode_segment(&i.bucket), encode_key(from)),
            )
            .header("x-amz-metadata-directive", "REPLACE");
        for (name, value) in meta {
            b = b.header(format!("x-amz-meta-{name}"), value.as_str());
        }
        let mut req = b
            .body(HttpRequestBody::empty())
            .map_err(|e| StoreUnavailable(format!("copy request for {to}: {e}")))?;
        AwsAuthorizer::new(&i.credential, "s3", &i.region).authorize(&mut req, None);
        let http = i.http.clone();
        let r = self
            .timed("copy", async move {
                let resp = http
                    .execute(req)
                    .await
                    .map_err(|e| object_store::Error::Generic {
                        store: "S3",
                        source: Box::new(e),
                    })?;
                let status = resp.status();
                let body =
                    resp.into_body()
                        .bytes()
                        .await
                        .map_err(|e| object_store::Error::Generic {
                            store: "S3",
                            source: Box::new(e),
                        })?;
                // S3 may answer a copy 200 and still report an error in the body.
                let text = String::from_utf8_lossy(&body);
                if status.is_success() && text.contains("CopyObjectResult") {
                    Ok(())
                } else {
                    Err(object_store::Error::Generic {
                        store: "S3",
                        source: format!("copy answered {status}: {}", text.trim()).into(),
                    })
                }
            })
            .await;
        r.map_err(|e| unavailable("copy", e))
    }

    /// Opens an upload whose body will be stored under its content address.
    pub fn begin(
        &self,
        host: &str,
        ep: &str,
        sha: &str,
        commit: &str,
        length: u64,
    ) -> io::Result<Box<dyn Upload>> {
        let key = self
            .body_key(host, ep, sha)
            .map_err(StoreUnavailable::into_io)?;
        // S3 allows 10,000 parts: bodies over ~45 GiB get larger parts.
        let part = PART_BYTES.max((length as usize).div_ceil(9_000).next_multiple_of(1 << 20));
        let cap = (length as usize).clamp(1, part);
        let rt = Handle::current();
        let permit = Some(reserve(&rt, &self.inner.buffers, cap)?);
        Ok(Box::new(S3Upload {
            store: self.clone(),
            rt,
            permit,
            part,
            host: host.to_string(),
            ep: ep.to_string(),
            sha: sha.to_string(),
            commit: commit.to_string(),
            key,
            buf: Vec::with_capacity(cap),
            multipart: None,
            in_flight: None,
        }))
    }

    /// `reindex`: writes the index object of every episode whose row is missing or names
    /// another body; reports ids with several bodies on stderr. Returns (rows ok, skipped).
    pub async fn reindex(&self) -> anyhow::Result<(usize, usize)> {
        let groups = self.all_bodies().await?;
        let (mut ok, mut bad) = (0, 0);
        for ((host, ep), bodies) in groups {
            report_conflict(&host, &ep, &bodies);
            let first = &bodies[0];
            let current = self.read_row(&host, &ep).await?;
            if current.as_ref().is_some_and(|r| r.tar_sha256 == first.sha) {
                ok += 1;
                continue;
            }
            match self.row_from_body(&host, &ep, first).await {
                Ok(row) => {
                    self.write_row(&row).await?;
                    ok += 1;
                }
                Err(e) => {
                    eprintln!("{}: skipped: {e}", first.key);
                    bad += 1;
                }
            }
        }
        Ok((ok, bad))
    }

    /// `export-index`: every index row as a JSON line, in key order; conflicts and bodies
    /// without a row are reported on stderr.
    pub async fn export_index(&self, out: &mut (dyn Write + Send)) -> anyhow::Result<()> {
        let groups = self.all_bodies().await?;
        let rows = self.list("list", "index").await?;
        let mut indexed = std::collections::HashSet::new();
        for m in rows {
            let key = m.location.clone();
            let Some(bytes) = self.get_bytes("get_index", &key).await? else {
                continue;
            };
            match serde_json::from_slice::<IndexRow>(&bytes) {
                Ok(row) => {
                    writeln!(out, "{}", serde_json::to_string(&row)?)?;
                    indexed.insert((row.host_id, row.episode_id));
                }
                Err(e) => eprintln!("{key}: unreadable index row: {e}"),
            }
        }
        for ((host, ep), bodies) in &groups {
            report_conflict(host, ep, bodies);
            if !indexed.contains(&(host.clone(), ep.clone())) {
                eprintln!(
                    "{host}/{ep}: stored without an index row (run `cis490-receiver reindex`)"
                );
            }
        }
        Ok(())
    }

    /// Every body in the bucket grouped by (host, id), each group in episode order.
    async fn all_bodies(&self) -> Result<BTreeMap<(String, String), Vec<Body>>, StoreUnavailable> {
        let metas = self.list("list", "episodes").await?;
        let mut groups: BTreeMap<(String, String), Vec<Body>> = BTreeMap::new();
        let strip = format!("{}episodes/", self.inner.prefix);
        for m in metas {
            let Some(b) = self.body_of(&m) else { continue };
            let rest = b.key.strip_prefix(&strip).unwrap_or(&b.key);
            let mut parts = rest.split('/');
            let (Some(host), Some(ep)) = (parts.next(), parts.next()) else {
                continue;
            };
            groups
                .entry((host.to_string(), ep.to_string()))
                .or_default()
                .push(b);
        }
        for v in groups.values_mut() {
            v.sort_by(episode_order);
        }
        Ok(groups)
    }
}

fn report_conflict(host: &str, ep: &str, bodies: &[Body]) {
    if bodies.len() > 1 {
        let others: Vec<&str> = bodies[1..].iter().map(|b| b.sha.as_str()).collect();
        eprintln!(
            "{host}/{ep}: conflict: {} bodies stored; the episode is {} (earliest), also kept: {}",
            bodies.len(),
            bodies[0].sha,
            others.join(", ")
        );
    }
}

/// What a refused upload leaves in the quarantine besides its reason.
enum QuarantineBody {
    None,
    Bytes(Bytes),
    /// A completed temporary object of this many bytes, copied inside the bucket.
    Copy(Key, u64),
}

/// Percent-encodes one key segment as a path of a signed request carries it.
fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn encode_key(k: &Key) -> String {
    k.as_ref()
        .split('/')
        .map(encode_segment)
        .collect::<Vec<_>>()
        .join("/")
}

/// Takes `bytes` of the shared buffer budget, waiting at most [`BUFFER_WAIT`].
fn reserve(rt: &Handle, sem: &Arc<Semaphore>, bytes: usize) -> io::Result<OwnedSemaphorePermit> {
    // A part larger than the whole budget waits for all of it rather than forever.
    let kib = bytes.div_ceil(1024).min(BUFFER_BUDGET / 1024) as u32;
    let sem = sem.clone();
    rt.block_on(async move {
        match tokio::time::timeout(BUFFER_WAIT, sem.acquire_many_owned(kib)).await {
            Ok(Ok(p)) => Ok(p),
            Ok(Err(_)) => Err(StoreUnavailable("buffer budget closed".into()).into_io()),
            Err(_) => Err(StoreUnavailable(format!(
                "no upload buffer memory free for {}s (too many large uploads in flight)",
                BUFFER_WAIT.as_secs()
            ))
            .into_io()),
        }
    })
}

/// An upload on its way into the bucket: buffered up to one part, then multipart.
struct S3Upload {
    store: S3Store,
    rt: Handle,
    /// The budget `buf` holds; a sent part takes it along until the part is stored.
    permit: Option<OwnedSemaphorePermit>,
    /// Bytes per part (at least [`PART_BYTES`]).
    part: usize,
    host: String,
    ep: String,
    sha: String,
    commit: String,
    key: Key,
    buf: Vec<u8>,
    multipart: Option<Box<dyn MultipartUpload>>,
    in_flight: Option<JoinHandle<object_store::Result<()>>>,
}

impl S3Upload {
    fn wait_in_flight(&mut self) -> io::Result<()> {
        if let Some(h) = self.in_flight.take() {
            let r = self
                .rt
                .block_on(h)
                .map_err(|e| StoreUnavailable(format!("part upload task: {e}")).into_io())?;
            r.map_err(|e| unavailable("put_part", e).into_io())?;
        }
        Ok(())
    }

    /// Sends the buffer as the next part (opening the multipart upload first if needed).
    fn send_part(&mut self, last: bool) -> io::Result<()> {
        if self.multipart.is_none() {
            let attrs: Attributes = [
                meta_attr("tar-sha256", self.sha.clone()),
                meta_attr("commit", self.commit.clone()),
            ]
            .into_iter()
            .collect();
            let os = self.store.inner.os.clone();
            let key = self.key.clone();
            let mp = self
                .rt
                .block_on(self.store.timed("create_multipart", async move {
                    os.put_multipart_opts(&key, PutMultipartOptions::from(attrs))
                        .await
                }))
                .map_err(|e| unavailable("create_multipart", e).into_io())?;
            self.multipart = Some(mp);
        }
        self.wait_in_flight()?;
        // The part goes out with the memory it holds; only then is memory for the next buffer
        // taken, so a waiting upload always has a part in flight that will give memory back.
        let held = self.permit.take();
        let next_cap = if last { 0 } else { self.part };
        let data = Bytes::from(std::mem::take(&mut self.buf));
        if let Some(mp) = self.multipart.as_mut() {
            let fut = mp.put_part(PutPayload::from(data));
            let store = self.store.clone();
            self.in_flight = Some(self.rt.spawn(async move {
                let _held = held;
                store.timed("put_part", fut).await
            }));
        }
        if !last {
            self.permit = Some(reserve(&self.rt, &self.store.inner.buffers, next_cap)?);
            self.buf = Vec::with_capacity(next_cap);
        }
        Ok(())
    }

    fn abort(&mut self) {
        if let Some(mut mp) = self.multipart.take() {
            if let Some(h) = self.in_flight.take() {
                h.abort();
            }
            let store = self.store.clone();
            // Detached: an abandoned multipart upload is invisible under episodes/ either way;
            // aborting just frees its parts sooner.
            self.rt.spawn(async move {
                if let Err(e) = store.timed("abort_multipart", mp.abort()).await {
                    tracing::warn!(error = %e, "failed to abort a multipart upload; the bucket's lifecycle rules will reclaim it");
                }
            });
        }
    }

    fn row(&self, v: &Validated, bytes: u64) -> IndexRow {
        IndexRow::new(
            &self.host,
            &self.ep,
            self.key.to_string(),
            bytes,
            v,
            timefmt::now_rfc3339(),
        )
    }
}

impl Write for S3Upload {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let room = self.part - self.buf.len();
        let n = data.len().min(room);
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == self.part {
            self.send_part(false)?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Upload for S3Upload {
    fn commit(mut self: Box<Self>, v: &Validated) -> io::Result<CommitOutcome> {
        // The validator checked the body against the header's SHA, which names the key.
        if v.tar_sha256 != self.sha {
            self.abort();
            return Err(io::Error::other(
                "validated SHA-256 differs from the upload key",
            ));
        }
        let bytes = v.compressed_bytes;
        if self.multipart.is_some() {
            if !self.buf.is_empty() {
                self.send_part(true)?;
            }
            self.wait_in_flight()?;
            let store = self.store.clone();
            // What the multipart body's metadata cannot carry (known only now), written before
            // the body becomes visible so a lost index row never needs the body re-read.
            let summary = Summary {
                commit: v.commit.to_string(),
                uncompressed_bytes: v.uncompressed_bytes,
                files: v.files,
            };
            self.rt
                .block_on(store.write_summary(&self.host, &self.ep, &self.sha, &summary))
                .map_err(StoreUnavailable::into_io)?;
            if let Some(mp) = self.multipart.as_mut() {
                let r = self
                    .rt
                    .block_on(store.timed("complete_multipart", mp.complete()));
                if let Err(e) = r {
                    self.abort();
                    return Err(unavailable("complete_multipart", e).into_io());
                }
            }
            self.multipart = None;
        } else {
            let attrs: Attributes = [
                meta_attr("tar-sha256", self.sha.clone()),
                meta_attr("commit", v.commit.to_string()),
                meta_attr("uncompressed-bytes", v.uncompressed_bytes.to_string()),
                meta_attr("files", v.files.to_string()),
            ]
            .into_iter()
            .collect();
            let data = Bytes::from(std::mem::take(&mut self.buf));
            self.rt
                .block_on(self.store.put("put", &self.key, data, attrs))
                .map_err(StoreUnavailable::into_io)?;
        }
        // Decide from what is stored now: if a different body of this id is there too (two
        // receivers raced with two bodies), this upload is answered 409 and writes no row,
        // whichever body is older. A multipart body's LastModified is its start, so a body
        // stored and answered 201 meanwhile can be "younger" than this one; answering 201 here
        // too would retire two different bodies. Both are kept; readers apply the order rule.
        let row = self.row(v, bytes);
        let store = self.store.clone();
        self.rt
            .block_on(async move { store.settle(row).await })
            .map_err(StoreUnavailable::into_io)
    }

    fn quarantine(mut self: Box<Self>, note: &QuarantineNote) -> io::Result<()> {
        // A body still in the buffer is kept; one already partly sent is aborted (S3 cannot
        // move it) and only its reason is kept.
        let kept_body = self.multipart.is_none();
        self.abort();
        let store = self.store.clone();
        let body = if kept_body {
            QuarantineBody::Bytes(Bytes::from(std::mem::take(&mut self.buf)))
        } else {
            QuarantineBody::None
        };
        let note = note.clone();
        self.rt
            .block_on(async move { store.keep_in_quarantine(&note, body).await })
            .map_err(StoreUnavailable::into_io)
    }
}

impl Drop for S3Upload {
    fn drop(&mut self) {
        self.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quarantine_entry_seen_by_one_object_still_removes_both() {
        let body = Key::from("p/quarantine/h/20261207T000000Z-ep-7.tar.zst");
        let reason = Key::from("p/quarantine/h/20261207T000000Z-ep-7.reason.json");
        // A listing that showed only the reason: the body goes too.
        assert_eq!(
            quarantine_pair(std::slice::from_ref(&reason)),
            vec![reason.clone(), body.clone()]
        );
        assert_eq!(
            quarantine_pair(std::slice::from_ref(&body)),
            vec![body.clone(), reason.clone()]
        );
        // Both listed: each once.
        assert_eq!(
            quarantine_pair(&[reason.clone(), body.clone()]),
            vec![reason, body]
        );
    }
}
