//! Resumable uploads on the bucket (SPEC §13): a body long enough for a multipart upload goes
//! into one under `tmp/resume/`, with a small record beside it that any receiver can read to
//! continue the upload after this one is gone.
//!
//! Keys (under the configured prefix):
//! - `tmp/resume/<host>/<id>/<sha>.<length>.json`: the record (upload id, temporary key, each
//!   durably uploaded part with its ETag, end offset and the SHA-256 state after it), rewritten
//!   after every part.
//! - `tmp/resume/<host>/<id>/<sha>.<length>.<nonce>.tar.zst`: the multipart upload, completed
//!   only once the whole body arrived. Its parts cannot be read back, so a resumed body is
//!   completed here first and then read back whole through the validator; only a valid body is
//!   copied under `episodes/`.

use std::collections::HashSet;
use std::io::{self, Read, Write};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::StreamExt;
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path as Key;
use object_store::{Attributes, ObjectStore, PutPayload};
use serde::{Deserialize, Serialize};
use sha2::digest::generic_array::GenericArray;
use tokio::runtime::Handle;
use tokio::sync::OwnedSemaphorePermit;
use tokio::task::JoinHandle;

use cis490_common::timefmt;

use super::{reserve, unavailable, S3Store, Summary, PART_BYTES};
use crate::ingest::Validated;
use crate::store::resume::{PartError, ResumeKey, MIN_KEPT};
use crate::store::{CommitOutcome, QuarantineNote, StoreUnavailable, Upload};

/// SHA-256 whose state can be written down at a 64-byte boundary and taken up again, so a
/// receiver continuing an upload can go on hashing the body from where the record left off
/// without the earlier bytes (which stay unreadable in the multipart upload).
#[derive(Clone)]
pub(super) struct Running {
    state: [u32; 8],
    /// Bytes hashed.
    len: u64,
    /// Bytes of a block not yet full.
    tail: Vec<u8>,
}

const H0: [u32; 8] = [
    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
];

impl Running {
    pub(super) fn new() -> Running {
        Running {
            state: H0,
            len: 0,
            tail: Vec::with_capacity(64),
        }
    }

    fn compress(&mut self, block: &[u8]) {
        sha2::compress256(
            &mut self.state,
            std::slice::from_ref(GenericArray::from_slice(block)),
        );
    }

    pub(super) fn update(&mut self, mut data: &[u8]) {
        self.len += data.len() as u64;
        if !self.tail.is_empty() {
            let n = (64 - self.tail.len()).min(data.len());
            self.tail.extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.tail.len() < 64 {
                return;
            }
            let block = std::mem::take(&mut self.tail);
            self.compress(&block);
            self.tail = block;
            self.tail.clear();
        }
        let mut blocks = data.chunks_exact(64);
        for b in &mut blocks {
            self.compress(b);
        }
        self.tail.extend_from_slice(blocks.remainder());
    }

    /// The state as 64 hex digits, when the bytes hashed end on a block boundary.
    pub(super) fn midstate(&self) -> Option<String> {
        self.tail.is_empty().then(|| {
            let bytes: Vec<u8> = self.state.iter().flat_map(|w| w.to_be_bytes()).collect();
            hex::encode(bytes)
        })
    }

    /// Takes up a state written by [`Running::midstate`] after `len` bytes.
    pub(super) fn resume(midstate: &str, len: u64) -> Option<Running> {
        let bytes = hex::decode(midstate).ok()?;
        if bytes.len() != 32 || len % 64 != 0 {
            return None;
        }
        let mut state = [0u32; 8];
        for (w, c) in state.iter_mut().zip(bytes.chunks_exact(4)) {
            *w = u32::from_be_bytes([c[0], c[1], c[2], c[3]]);
        }
        Some(Running {
            state,
            len,
            tail: Vec::with_capacity(64),
        })
    }

    /// The SHA-256 (hex) of everything hashed so far.
    pub(super) fn finish(&self) -> String {
        let mut s = self.clone();
        let bits = s.len.wrapping_mul(8);
        let mut pad = vec![0x80u8];
        let used = (s.tail.len() + 1) % 64;
        let zeros = if used <= 56 { 56 - used } else { 120 - used };
        pad.resize(1 + zeros, 0);
        pad.extend_from_slice(&bits.to_be_bytes());
        s.update(&pad);
        let bytes: Vec<u8> = s.state.iter().flat_map(|w| w.to_be_bytes()).collect();
        hex::encode(bytes)
    }

    fn len(&self) -> u64 {
        self.len
    }
}

/// One part of the multipart upload, stored and acknowledged.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct PartRec {
    pub(super) etag: String,
    /// Body offset just past this part.
    pub(super) end: u64,
    /// [`Running::midstate`] after this part (absent for a last, unaligned part).
    pub(super) sha256_state: Option<String>,
}

/// The resume record kept beside a multipart upload.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Record {
    pub(super) host_id: String,
    pub(super) episode_id: String,
    pub(super) tar_sha256: String,
    pub(super) length: u64,
    /// The key the multipart upload completes to (under `tmp/resume/`).
    pub(super) temp_key: String,
    pub(super) upload_id: String,
    pub(super) part_bytes: u64,
    pub(super) parts: Vec<PartRec>,
    pub(super) created: String,
    pub(super) updated: String,
    /// The receiver that wrote this version (for a person reading the bucket).
    pub(super) writer: String,
}

impl Record {
    fn covered(&self) -> u64 {
        self.parts.last().map_or(0, |p| p.end)
    }

    /// What `check` offers: the last part boundary short of the whole body, when more than
    /// [`MIN_KEPT`] bytes lie before it.
    fn offer(&self) -> u64 {
        self.parts
            .iter()
            .rev()
            .map(|p| p.end)
            .find(|&end| end < self.length)
            .filter(|&end| end > MIN_KEPT)
            .unwrap_or(0)
    }

    /// Whether the record describes this body and its parts tile it as the upload wrote them.
    fn consistent(&self, host: &str, ep: &str, sha: &str, length: u64) -> bool {
        let p = self.part_bytes;
        self.host_id == host
            && self.episode_id == ep
            && self.tar_sha256 == sha
            && self.length == length
            && p > 0
            && p % 64 == 0
            && self
                .parts
                .iter()
                .enumerate()
                .all(|(i, r)| r.end == ((i as u64 + 1) * p).min(length))
    }
}

/// The ids with a recorded upload running on this receiver: one at a time per id.
#[derive(Default)]
pub(super) struct Busy(std::sync::Mutex<HashSet<(String, String)>>);

impl Busy {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<(String, String)>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// An id reserved for one recorded upload; released when dropped.
pub(crate) struct Claim {
    store: S3Store,
    id: (String, String),
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.store.inner.busy.lock().remove(&self.id);
    }
}

/// What a recorded upload starts from: nothing, or the checked prefix of a record.
pub(crate) struct Held {
    claim: Claim,
    from: Option<(Record, Running)>,
}

fn record_rel(host: &str, ep: &str, sha: &str, length: u64) -> String {
    format!("tmp/resume/{host}/{ep}/{sha}.{length}.json")
}

impl S3Store {
    /// Whether interrupted uploads are kept (`resume_max_bytes > 0`).
    pub(crate) fn resume_enabled(&self) -> bool {
        self.inner.resume_max_bytes > 0
    }

    /// Whether a body of `length` bytes goes through a recorded multipart upload.
    pub(crate) fn recorded(&self, length: u64) -> bool {
        self.resume_enabled() && length >= PART_BYTES as u64
    }

    /// Reserves the id for one recorded upload; `None` while another runs here.
    pub(crate) fn claim(&self, host: &str, ep: &str) -> Option<Claim> {
        let id = (host.to_string(), ep.to_string());
        self.inner.busy.lock().insert(id.clone()).then(|| Claim {
            store: self.clone(),
            id,
        })
    }

    pub(crate) fn resumed_total(&self) -> u64 {
        self.inner
            .resumed
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Bytes the records in the bucket covered at the last resume pass.
    pub(crate) fn resumable_bytes(&self) -> u64 {
        self.inner
            .resumable_bytes
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    fn expired(&self, modified: SystemTime) -> bool {
        SystemTime::now()
            .duration_since(modified)
            .is_ok_and(|age| age > Duration::from_secs(self.inner.resume_keep_s))
    }

    async fn read_record(
        &self,
        key: &Key,
    ) -> Result<Option<(Record, SystemTime)>, StoreUnavailable> {
        let os = self.inner.os.clone();
        let k = key.clone();
        let r = self
            .timed("get_record", async move {
                let got = os.get(&k).await?;
                let modified = SystemTime::from(got.meta.last_modified);
                Ok((got.bytes().await?, modified))
            })
            .await;
        match r {
            Ok((bytes, modified)) => Ok(serde_json::from_slice(&bytes).ok().map(|r| (r, modified))),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(unavailable("get_record", e)),
        }
    }

    async fn write_record(&self, rec: &Record) -> Result<(), StoreUnavailable> {
        let key = self.key(&record_rel(
            &rec.host_id,
            &rec.episode_id,
            &rec.tar_sha256,
            rec.length,
        ))?;
        let json = serde_json::to_vec(rec).map_err(|e| StoreUnavailable(e.to_string()))?;
        self.put("put_record", &key, Bytes::from(json), Attributes::new())
            .await
    }

    async fn delete_record(&self, rec: &Record) -> Result<(), StoreUnavailable> {
        let key = self.key(&record_rel(
            &rec.host_id,
            &rec.episode_id,
            &rec.tar_sha256,
            rec.length,
        ))?;
        self.delete(&key).await
    }

    /// Aborts a record's multipart upload (gone already counts as done) and deletes the record.
    async fn drop_record(&self, rec: &Record) -> Result<(), StoreUnavailable> {
        let temp = Key::parse(&rec.temp_key).map_err(|e| StoreUnavailable(e.to_string()))?;
        let os = self.inner.os.clone();
        let id = rec.upload_id.clone();
        match self
            .timed("abort_multipart", async move {
                MultipartStore::abort_multipart(&*os, &temp, &id).await
            })
            .await
        {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(unavailable("abort_multipart", e)),
        }
        self.delete_record(rec).await
    }

    /// The offset `check` offers for this body (0: start from zero).
    pub(crate) async fn offered(&self, host: &str, ep: &str, sha: &str, length: u64) -> u64 {
        if !self.recorded(length) {
            return 0;
        }
        let Ok(key) = self.key(&record_rel(host, ep, sha, length)) else {
            return 0;
        };
        match self.read_record(&key).await {
            Ok(Some((rec, modified)))
                if !self.expired(modified) && rec.consistent(host, ep, sha, length) =>
            {
                rec.offer()
            }
            Ok(_) => 0,
            Err(e) => {
                tracing::warn!(error = %e, "failed to read a resume record; offering nothing");
                0
            }
        }
    }

    /// Checks a resume from `start` against the record before the body is read: the record
    /// must hold a part ending exactly at `start`, and the SHA-256 of the body up to it must be
    /// the client's. A mismatch drops the record (its bytes are of no use to anyone).
    pub(crate) async fn resume_from(
        &self,
        body: &ResumeKey,
        start: u64,
        prefix_sha256: Option<&str>,
        claim: Claim,
    ) -> Result<Held, PartError> {
        let (host, ep, sha, length) = (
            body.host.as_str(),
            body.episode.as_str(),
            body.tar_sha256.as_str(),
            body.length,
        );
        if start == 0 {
            return Ok(Held { claim, from: None });
        }
        let none = |why: &str| PartError::Unavailable {
            offset: 0,
            why: why.to_string(),
        };
        let key = self
            .key(&record_rel(host, ep, sha, length))
            .map_err(|e| PartError::Io(e.into_io()))?;
        let Some((mut rec, modified)) = self
            .read_record(&key)
            .await
            .map_err(|e| PartError::Io(e.into_io()))?
        else {
            return Err(none(
                "the bucket holds no part of this body (expired, dropped, or never received)",
            ));
        };
        if self.expired(modified) {
            return Err(none(
                "the held part of this body expired (limits.resume_keep_s)",
            ));
        }
        if !rec.consistent(host, ep, sha, length) {
            return Err(none("the resume record of this body does not describe it"));
        }
        let at = rec
            .parts
            .iter()
            .position(|p| p.end == start && p.end < length);
        let Some(i) = at else {
            return Err(PartError::Unavailable {
                offset: rec.offer(),
                why: format!(
                    "the bucket holds {} bytes of this body in parts of {}; byte {start} is not a part boundary it holds",
                    rec.covered(),
                    rec.part_bytes
                ),
            });
        };
        let running = rec.parts[i]
            .sha256_state
            .as_deref()
            .and_then(|s| Running::resume(s, start));
        let Some(running) = running else {
            return Err(none("the resume record lacks the hash state at that part"));
        };
        if Some(running.finish().as_str()) != prefix_sha256 {
            tracing::warn!(
                host = %host,
                episode = %ep,
                offset = start,
                "the recorded prefix of an upload does not match the client's; dropped it"
            );
            if let Err(e) = self.drop_record(&rec).await {
                tracing::warn!(error = %e, "failed to drop a resume record");
            }
            return Err(none(&format!(
                "the SHA-256 of the held bytes 0..{start} differs from X-Cis490-Resume-Prefix-SHA256; send the whole body"
            )));
        }
        rec.parts.truncate(i + 1);
        self.inner
            .resumed
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(Held {
            claim,
            from: Some((rec, running)),
        })
    }

    /// Drops every record of an id (a new upload of it starts from zero).
    async fn drop_records_of(&self, host: &str, ep: &str) -> Result<(), StoreUnavailable> {
        for m in self
            .list("list", &format!("tmp/resume/{host}/{ep}/"))
            .await?
        {
            if !m.location.as_ref().ends_with(".json") {
                continue;
            }
            if let Some((rec, _)) = self.read_record(&m.location).await? {
                self.drop_record(&rec).await?;
            } else {
                self.delete(&m.location).await?;
            }
        }
        Ok(())
    }

    /// Opens a recorded upload (on a blocking thread): a new multipart upload with its first
    /// record, or the recorded one continued.
    pub(crate) fn begin_recorded(
        &self,
        host: &str,
        ep: &str,
        sha: &str,
        length: u64,
        held: Held,
    ) -> io::Result<Box<dyn Upload>> {
        let rt = Handle::current();
        let Held { claim, from } = held;
        let (rec, running, resumed) = match from {
            Some((rec, running)) => (rec, running, true),
            None => {
                let store = self.clone();
                let (h, e, s) = (host.to_string(), ep.to_string(), sha.to_string());
                let rec = rt
                    .block_on(async move {
                        store.drop_records_of(&h, &e).await?;
                        let nonce: u64 = rand::random();
                        let temp = store.key(&format!(
                            "tmp/resume/{h}/{e}/{s}.{length}.{nonce:016x}.tar.zst"
                        ))?;
                        let os = store.inner.os.clone();
                        let t = temp.clone();
                        let id = store
                            .timed("create_multipart", async move {
                                MultipartStore::create_multipart(&*os, &t).await
                            })
                            .await
                            .map_err(|e| unavailable("create_multipart", e))?;
                        let now = timefmt::now_rfc3339();
                        let rec = Record {
                            host_id: h,
                            episode_id: e,
                            tar_sha256: s,
                            length,
                            temp_key: temp.to_string(),
                            upload_id: id,
                            part_bytes: part_bytes(length),
                            parts: Vec::new(),
                            created: now.clone(),
                            updated: now,
                            writer: store.inner.instance.clone(),
                        };
                        // Written before any part: no upload this receiver starts is ever
                        // without a record the janitor can find.
                        store.write_record(&rec).await?;
                        Ok::<Record, StoreUnavailable>(rec)
                    })
                    .map_err(StoreUnavailable::into_io)?;
                (rec, Running::new(), false)
            }
        };
        let part = rec.part_bytes as usize;
        let cap = ((length - running.len()) as usize).clamp(1, part);
        let permit = Some(reserve(&rt, &self.inner.buffers, cap)?);
        let temp = Key::parse(&rec.temp_key).map_err(|e| io::Error::other(e.to_string()))?;
        Ok(Box::new(Recorded {
            store: self.clone(),
            rt,
            permit,
            part,
            temp,
            rec,
            running,
            buf: Vec::with_capacity(cap),
            in_flight: None,
            resumed,
            state: State::Open,
            _claim: claim,
        }))
    }

    /// Copies a validated body to its content address with the whole upload's metadata.
    async fn publish(
        &self,
        temp: &Key,
        rec: &Record,
        v: &Validated,
    ) -> Result<CommitOutcome, StoreUnavailable> {
        let summary = Summary {
            commit: v.commit.to_string(),
            uncompressed_bytes: v.uncompressed_bytes,
            files: v.files,
        };
        self.write_summary(&rec.host_id, &rec.episode_id, &rec.tar_sha256, &summary)
            .await?;
        let key = self.body_key(&rec.host_id, &rec.episode_id, &rec.tar_sha256)?;
        self.copy_with_metadata(
            temp,
            &key,
            &[
                ("tar-sha256", rec.tar_sha256.clone()),
                ("commit", v.commit.to_string()),
                ("uncompressed-bytes", v.uncompressed_bytes.to_string()),
                ("files", v.files.to_string()),
            ],
        )
        .await?;
        let row = crate::store::IndexRow::new(
            &rec.host_id,
            &rec.episode_id,
            key.to_string(),
            v.compressed_bytes,
            v,
            timefmt::now_rfc3339(),
        );
        let out = self.settle(row).await?;
        self.delete(temp).await?;
        Ok(out)
    }

    /// The resume pass (at start, then hourly): aborts the uploads of records older than
    /// `resume_keep_s`, then the oldest while the records cover more than `resume_max_bytes`,
    /// and deletes completed temporary bodies left behind by a killed receiver.
    pub(crate) async fn clean_resumes(&self) -> Result<u64, StoreUnavailable> {
        let metas = self.list("list", "tmp/resume/").await?;
        let busy = self.inner.busy.lock().clone();
        let strip = format!("{}tmp/resume/", self.inner.prefix);
        let mut kept = Vec::new();
        for m in metas {
            let key = m.location.to_string();
            let modified = SystemTime::from(m.last_modified);
            let mut parts = key.strip_prefix(&strip).unwrap_or(&key).split('/');
            let id = (
                parts.next().unwrap_or("").to_string(),
                parts.next().unwrap_or("").to_string(),
            );
            if busy.contains(&id) {
                continue;
            }
            let expired = self.expired(modified);
            if !key.ends_with(".json") {
                if expired {
                    tracing::info!(event = "cleanup", key = %key, "deleting a temporary body left behind");
                    self.delete(&m.location).await?;
                }
                continue;
            }
            match self.read_record(&m.location).await? {
                Some((rec, _)) if expired => {
                    tracing::info!(event = "cleanup", key = %key, bytes = rec.covered(), "aborting an upload not resumed within limits.resume_keep_s");
                    self.drop_record(&rec).await?;
                }
                Some((rec, _)) => kept.push((modified, rec)),
                None if expired => self.delete(&m.location).await?,
                None => {}
            }
        }
        kept.sort_by_key(|a| a.0);
        let mut total: u64 = kept.iter().map(|(_, r)| r.covered()).sum();
        for (_, rec) in &kept {
            if total <= self.inner.resume_max_bytes {
                break;
            }
            tracing::info!(event = "cleanup", host = %rec.host_id, episode = %rec.episode_id, bytes = rec.covered(), "aborting the oldest held upload (limits.resume_max_bytes)");
            self.drop_record(rec).await?;
            total -= rec.covered();
        }
        self.inner
            .resumable_bytes
            .store(total, std::sync::atomic::Ordering::Relaxed);
        Ok(total)
    }
}

/// Bytes per part for a body of `length`: at least [`PART_BYTES`], larger for bodies that
/// would otherwise need more than S3's 10,000 parts; always whole MiB (so a part ends on a
/// SHA-256 block boundary).
fn part_bytes(length: u64) -> u64 {
    (PART_BYTES as u64).max(length.div_ceil(9_000).next_multiple_of(1 << 20))
}

enum State {
    /// Parts going up; the multipart upload is open.
    Open,
    /// Open, but no longer worth resuming (its completion failed).
    Abandoned,
    /// Completed into the temporary object; the record is gone.
    Completed,
    /// Published or quarantined: nothing left to clean up.
    Done,
}

/// A body going into a recorded multipart upload.
struct Recorded {
    store: S3Store,
    rt: Handle,
    permit: Option<OwnedSemaphorePermit>,
    part: usize,
    temp: Key,
    /// The parts stored so far, as the record in the bucket lists them.
    rec: Record,
    /// SHA-256 over every body byte from 0 to the end of `buf`.
    running: Running,
    buf: Vec<u8>,
    in_flight: Option<JoinHandle<Result<PartRec, PartFailed>>>,
    /// Continues a record: the body is validated once it is whole, read back from the bucket.
    resumed: bool,
    state: State,
    _claim: Claim,
}

/// A part that did not go up; `gone` when the bucket no longer knows the upload (aborted by
/// another receiver, or completed): its record must not be offered again.
struct PartFailed {
    gone: bool,
    error: StoreUnavailable,
}

impl From<StoreUnavailable> for PartFailed {
    fn from(error: StoreUnavailable) -> Self {
        PartFailed { gone: false, error }
    }
}

impl Recorded {
    fn wait_in_flight(&mut self) -> io::Result<()> {
        if let Some(h) = self.in_flight.take() {
            let r = self
                .rt
                .block_on(h)
                .map_err(|e| StoreUnavailable(format!("part upload task: {e}")).into_io())?;
            match r {
                Ok(pr) => self.rec.parts.push(pr),
                Err(PartFailed { gone, error }) => {
                    if gone {
                        self.state = State::Abandoned;
                    }
                    return Err(error.into_io());
                }
            }
        }
        Ok(())
    }

    /// Sends the buffer as the next part; every part but the last is then entered in the
    /// record, so what a resume may reuse never runs ahead of what the bucket acknowledged.
    fn send_part(&mut self, last: bool) -> io::Result<()> {
        self.wait_in_flight()?;
        let held = self.permit.take();
        let data = PutPayload::from(Bytes::from(std::mem::take(&mut self.buf)));
        let idx = self.rec.parts.len();
        let end = self.running.len();
        let sha256_state = self.running.midstate();
        let mut next = (!last).then(|| self.rec.clone());
        let store = self.store.clone();
        let temp = self.temp.clone();
        let upload_id = self.rec.upload_id.clone();
        self.in_flight = Some(self.rt.spawn(async move {
            let _held = held;
            let os = store.inner.os.clone();
            let PartId { content_id } = store
                .timed("put_part", async move {
                    MultipartStore::put_part(&*os, &temp, &upload_id, idx, data).await
                })
                .await
                .map_err(|e| PartFailed {
                    gone: matches!(e, object_store::Error::NotFound { .. }),
                    error: unavailable("put_part", e),
                })?;
            let pr = PartRec {
                etag: content_id,
                end,
                sha256_state,
            };
            if let Some(rec) = next.as_mut() {
                rec.parts.push(pr.clone());
                rec.updated = timefmt::now_rfc3339();
                rec.writer = store.inner.instance.clone();
                store.write_record(rec).await?;
            }
            Ok(pr)
        }));
        if !last {
            self.permit = Some(reserve(&self.rt, &self.store.inner.buffers, self.part)?);
            self.buf = Vec::with_capacity(self.part);
        }
        Ok(())
    }

    /// Sends what is left and completes the multipart upload into the temporary object; the
    /// record goes (the upload it names no longer exists).
    fn complete(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() || (self.rec.parts.is_empty() && self.in_flight.is_none()) {
            self.send_part(true)?;
        }
        self.wait_in_flight()?;
        self.state = State::Abandoned;
        let store = self.store.clone();
        let temp = self.temp.clone();
        let rec = self.rec.clone();
        self.rt
            .block_on(async move {
                let parts = rec
                    .parts
                    .iter()
                    .map(|p| PartId {
                        content_id: p.etag.clone(),
                    })
                    .collect();
                let os = store.inner.os.clone();
                let id = rec.upload_id.clone();
                store
                    .timed("complete_multipart", async move {
                        MultipartStore::complete_multipart(&*os, &temp, &id, parts).await
                    })
                    .await
                    .map_err(|e| unavailable("complete_multipart", e))?;
                Ok::<(), StoreUnavailable>(())
            })
            .map_err(StoreUnavailable::into_io)?;
        self.state = State::Completed;
        let store = self.store.clone();
        let rec = self.rec.clone();
        if let Err(e) = self
            .rt
            .block_on(async move { store.delete_record(&rec).await })
        {
            tracing::warn!(error = %e, "failed to delete the record of a completed upload");
        }
        Ok(())
    }
}

impl Write for Recorded {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let room = self.part - self.buf.len();
        let n = data.len().min(room);
        self.buf.extend_from_slice(&data[..n]);
        self.running.update(&data[..n]);
        if self.buf.len() == self.part {
            self.send_part(false)?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Upload for Recorded {
    fn validates_afterwards(&self) -> bool {
        self.resumed
    }

    fn stored_body(&mut self) -> io::Result<Box<dyn Read + Send>> {
        if self.running.len() != self.rec.length {
            return Err(io::Error::other(format!(
                "the body ended at {} of {} bytes",
                self.running.len(),
                self.rec.length
            )));
        }
        self.complete()?;
        let os = self.store.inner.os_stream.clone();
        let k = self.temp.clone();
        let get = self
            .rt
            .block_on(self.store.timed("get", async move { os.get(&k).await }))
            .map_err(|e| unavailable("get", e).into_io())?;
        let stream = get
            .into_stream()
            .map(|r| r.map_err(|e| unavailable("get", e).into_io()));
        let reader = tokio_util::io::StreamReader::new(Box::pin(stream));
        Ok(Box::new(io::BufReader::with_capacity(
            1 << 20,
            tokio_util::io::SyncIoBridge::new_with_handle(reader, self.rt.clone()),
        )))
    }

    fn commit(mut self: Box<Self>, v: &Validated) -> io::Result<CommitOutcome> {
        if v.tar_sha256 != self.rec.tar_sha256 || v.compressed_bytes != self.rec.length {
            return Err(io::Error::other(
                "the validated body differs from the one the upload names",
            ));
        }
        if !matches!(self.state, State::Completed) {
            self.complete()?;
        }
        let store = self.store.clone();
        let (temp, rec, v2) = (self.temp.clone(), self.rec.clone(), v.clone());
        let out = self
            .rt
            .block_on(async move { store.publish(&temp, &rec, &v2).await })
            .map_err(StoreUnavailable::into_io)?;
        self.state = State::Done;
        Ok(out)
    }

    fn quarantine(mut self: Box<Self>, note: &QuarantineNote) -> io::Result<()> {
        // A completed body can be kept by a copy inside the bucket; an open upload cannot be
        // read, so only its reason is kept.
        let body = match self.state {
            State::Completed => super::QuarantineBody::Copy(self.temp.clone(), self.rec.length),
            _ => super::QuarantineBody::None,
        };
        if matches!(body, super::QuarantineBody::None) {
            // The part in flight may still rewrite the record: let it finish before the record
            // goes, or a record of an aborted upload could outlive it.
            if let Some(h) = self.in_flight.take() {
                let _ = self.rt.block_on(h);
            }
            let store = self.store.clone();
            let rec = self.rec.clone();
            if let Err(e) = self
                .rt
                .block_on(async move { store.drop_record(&rec).await })
            {
                tracing::warn!(error = %e, "failed to abort a refused multipart upload");
            }
        }
        let store = self.store.clone();
        let note = note.clone();
        let temp = self.temp.clone();
        let r = self.rt.block_on(async move {
            store.keep_in_quarantine(&note, body).await?;
            store.delete(&temp).await
        });
        self.state = State::Done;
        r.map_err(StoreUnavailable::into_io)
    }
}

impl Drop for Recorded {
    /// An upload that was neither published nor quarantined: an open one is kept for a resume
    /// once more than [`MIN_KEPT`] bytes are recorded, else aborted with its record.
    fn drop(&mut self) {
        let store = self.store.clone();
        match self.state {
            State::Done => {}
            State::Completed => {
                let temp = self.temp.clone();
                self.rt.spawn(async move {
                    if let Err(e) = store.delete(&temp).await {
                        tracing::warn!(error = %e, "failed to delete a temporary body; the resume pass will");
                    }
                });
            }
            State::Open | State::Abandoned => {
                // The part in flight is whole in memory: let it land, it lengthens the prefix.
                if let Some(h) = self.in_flight.take() {
                    match self.rt.block_on(h) {
                        Ok(Ok(pr)) => self.rec.parts.push(pr),
                        Ok(Err(PartFailed { gone: true, .. })) => self.state = State::Abandoned,
                        _ => {}
                    }
                }
                let covered = self.rec.covered();
                if matches!(self.state, State::Open) && covered > MIN_KEPT {
                    tracing::info!(
                        host = %self.rec.host_id,
                        episode = %self.rec.episode_id,
                        bytes = covered,
                        "kept the received part of an interrupted upload in the bucket for a resume"
                    );
                    return;
                }
                let rec = self.rec.clone();
                self.rt.spawn(async move {
                    if let Err(e) = store.drop_record(&rec).await {
                        tracing::warn!(error = %e, "failed to abort an interrupted multipart upload; the resume pass will");
                    }
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    #[test]
    fn the_running_hash_is_sha256_and_resumes_from_a_block_boundary() {
        let data: Vec<u8> = (0..200_003u32).map(|i| (i * 7 % 251) as u8).collect();
        for n in [0usize, 1, 55, 56, 63, 64, 65, 119, 120, 128, 4096, 200_003] {
            let mut r = Running::new();
            // Fed in uneven pieces.
            for c in data[..n].chunks(37) {
                r.update(c);
            }
            assert_eq!(r.finish(), hex::encode(Sha256::digest(&data[..n])), "{n}");
        }
        let mut r = Running::new();
        r.update(&data[..128 * 1024]);
        let mid = r.midstate().unwrap();
        let mut again = Running::resume(&mid, 128 * 1024).unwrap();
        again.update(&data[128 * 1024..]);
        assert_eq!(again.finish(), hex::encode(Sha256::digest(&data)));
        r.update(b"x");
        assert!(r.midstate().is_none(), "no state off a block boundary");
        assert!(Running::resume(&mid, 100).is_none());
    }

    fn rec(length: u64, ends: &[u64]) -> Record {
        Record {
            host_id: "h".into(),
            episode_id: "e".into(),
            tar_sha256: "a".repeat(64),
            length,
            temp_key: "tmp/x".into(),
            upload_id: "u".into(),
            part_bytes: 5 << 20,
            parts: ends
                .iter()
                .map(|&end| PartRec {
                    etag: "t".into(),
                    end,
                    sha256_state: None,
                })
                .collect(),
            created: String::new(),
            updated: String::new(),
            writer: String::new(),
        }
    }

    #[test]
    fn offers_are_part_boundaries_past_8_mib_and_short_of_the_body() {
        let m = 5u64 << 20;
        assert_eq!(rec(30 << 20, &[m]).offer(), 0, "5 MiB is not kept");
        assert_eq!(rec(30 << 20, &[m, 2 * m, 3 * m]).offer(), 3 * m);
        assert_eq!(
            rec(3 * m, &[m, 2 * m, 3 * m]).offer(),
            2 * m,
            "never the whole body"
        );
        assert!(rec(30 << 20, &[m, 2 * m]).consistent("h", "e", &"a".repeat(64), 30 << 20));
        assert!(!rec(30 << 20, &[m, 3 * m]).consistent("h", "e", &"a".repeat(64), 30 << 20));
        assert!(!rec(30 << 20, &[m]).consistent("h", "e", &"a".repeat(64), 31 << 20));
    }
}
