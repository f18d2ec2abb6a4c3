//! Durable episode storage (SPEC §5, §5b). [`Store`] is the one interface the rest of the
//! receiver sees: an upload goes temp -> validate -> commit (or quarantine), lookups answer
//! from what is stored. `fs.rs` is the filesystem layout, `s3.rs` the bucket layout.

pub(crate) mod fs;
pub(crate) mod group;
pub(crate) mod resume;
pub(crate) mod s3;
pub(crate) mod scrub;

use std::io::{self, Write};

use serde::{Deserialize, Serialize};

use cis490_common::timefmt;

use crate::ingest::Validated;

pub(crate) use fs::{FsOptions, FsStore};
pub(crate) use s3::{S3Options, S3Store};

/// One line of `index.jsonl` (SPEC §5).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexRow {
    pub ts: String,
    pub host_id: String,
    pub episode_id: String,
    pub path: String,
    pub bytes: u64,
    pub tar_sha256: String,
    pub uncompressed_bytes: u64,
    pub files: u64,
    pub commit: String,
}

impl IndexRow {
    /// The row of a validated body stored at `path` (relative to `store_dir` for the fs
    /// store, the full object key for S3), stamped `ts`.
    pub(crate) fn new(
        host_id: &str,
        episode_id: &str,
        path: String,
        bytes: u64,
        v: &Validated,
        ts: String,
    ) -> IndexRow {
        IndexRow {
            ts,
            host_id: host_id.to_string(),
            episode_id: episode_id.to_string(),
            path,
            bytes,
            tar_sha256: v.tar_sha256.clone(),
            uncompressed_bytes: v.uncompressed_bytes,
            files: v.files,
            commit: v.commit.to_string(),
        }
    }
}

/// How a commit attempt ended.
#[derive(Debug, Clone)]
pub enum CommitOutcome {
    Stored(IndexRow),
    /// Someone stored the same bytes first: the upload is discarded.
    AlreadyStored(IndexRow),
    /// Someone stored different bytes under this id: the upload is discarded.
    Conflict(IndexRow),
}

/// Why an upload was set aside, written beside it in the receiver's quarantine.
#[derive(Debug, Clone, Serialize)]
pub struct QuarantineNote {
    pub host_id: String,
    pub episode_id: String,
    pub commit: String,
    pub http_status: u16,
    pub error: String,
    pub message: String,
    pub quarantined_at: String,
}

impl QuarantineNote {
    /// A note stamped now, for the answer (`http_status`, `error`, `message`) the upload got.
    pub(crate) fn new(
        host_id: String,
        episode_id: String,
        commit: String,
        http_status: u16,
        error: &str,
        message: String,
    ) -> QuarantineNote {
        QuarantineNote {
            host_id,
            episode_id,
            commit,
            http_status,
            error: error.to_string(),
            message,
            quarantined_at: timefmt::now_rfc3339(),
        }
    }
}

/// An upload being written; dropped without `commit` or `quarantine`, it leaves nothing
/// (or, for a resumable one, the prefix a resume may reuse).
pub trait Upload: Write + Send {
    fn commit(self: Box<Self>, v: &Validated) -> io::Result<CommitOutcome>;
    fn quarantine(self: Box<Self>, note: &QuarantineNote) -> io::Result<()>;

    /// True when the upload continues a prefix that cannot be read while the rest arrives
    /// (S3): the bytes are written first, then [`Upload::stored_body`] is validated whole.
    fn validates_afterwards(&self) -> bool {
        false
    }

    /// The whole stored body, read back for validation, once every byte was written.
    fn stored_body(&mut self) -> io::Result<Box<dyn io::Read + Send>> {
        Err(io::Error::other("this upload is validated as it arrives"))
    }

    /// True when [`Upload::stored_body`] works, so the body may be written whole first and
    /// validated afterwards (the fs store's temp files: see `crate::decoders`).
    fn can_read_back(&self) -> bool {
        false
    }
}

/// What a resumable upload starts from, taken before its body is read.
pub(crate) enum Held {
    /// The fs store's part file, and a reader of its held prefix for the validator.
    Fs(resume::PartFile, Option<io::Take<std::fs::File>>),
    /// The S3 store's claim on the id, with the checked record of a resume.
    S3(Box<s3::Held>),
}

/// A store request failed or timed out: the client should retry (503 `store_unavailable`).
#[derive(Debug, thiserror::Error)]
#[error("the object store is unavailable: {0}")]
pub struct StoreUnavailable(pub String);

impl StoreUnavailable {
    pub fn into_io(self) -> io::Error {
        io::Error::other(self)
    }

    /// Whether an I/O error carries a store failure (as opposed to a local one).
    pub fn is(e: &io::Error) -> bool {
        e.get_ref().is_some_and(|i| i.is::<StoreUnavailable>())
    }
}

/// The store a receiver serves from, as the request handlers see it.
#[derive(Clone)]
pub enum Store {
    Fs(FsStore),
    S3(S3Store),
}

impl Store {
    /// The stored row of an id, if any (S3: decided from the bodies in the bucket).
    pub async fn find(
        &self,
        host_id: &str,
        episode_id: &str,
    ) -> Result<Option<IndexRow>, StoreUnavailable> {
        match self {
            Store::Fs(s) => s.get(host_id, episode_id).map_err(|e| {
                tracing::error!(error = %e, "failed to read a row back from index.jsonl");
                StoreUnavailable(format!("index.jsonl: {e}"))
            }),
            Store::S3(s) => s.find(host_id, episode_id).await,
        }
    }

    /// Like [`Store::find`], but a row whose body is no longer stored as indexed counts as no
    /// row (SPEC §15): what admission decides `already_stored` and `conflict` from.
    pub async fn find_intact(
        &self,
        host_id: &str,
        episode_id: &str,
    ) -> Result<Option<IndexRow>, StoreUnavailable> {
        match self {
            Store::Fs(s) => s.lookup_intact(host_id, episode_id).map_err(|e| {
                tracing::error!(error = %e, "failed to check a stored body");
                StoreUnavailable(format!("store: {e}"))
            }),
            Store::S3(s) => s.find_intact(host_id, episode_id).await,
        }
    }

    /// Opens an upload; called on a blocking thread (the S3 upload drives its requests from it).
    /// `held` is what a resumable upload starts from, when it is one.
    pub(crate) fn begin(
        &self,
        host_id: &str,
        episode_id: &str,
        tar_sha256: &str,
        commit: &str,
        length: u64,
        held: Option<Held>,
    ) -> io::Result<Box<dyn Upload>> {
        match (self, held) {
            (Store::Fs(s), Some(Held::Fs(part, _))) => s.begin(host_id, episode_id, Some(part)),
            (Store::Fs(s), _) => s.begin(host_id, episode_id, None),
            (Store::S3(s), Some(Held::S3(h))) => {
                s.begin_recorded(host_id, episode_id, tar_sha256, length, *h)
            }
            (Store::S3(s), _) => s.begin(host_id, episode_id, tar_sha256, commit, length),
        }
    }

    /// The fs store's `resume/` directory (the S3 store keeps its prefixes in the bucket).
    pub(crate) fn resumes(&self) -> Option<&resume::Resumes> {
        match self {
            Store::Fs(s) => Some(s.resumes()),
            Store::S3(_) => None,
        }
    }

    pub fn free_bytes(&self) -> Option<u64> {
        match self {
            Store::Fs(s) => s.free_bytes(),
            Store::S3(_) => None,
        }
    }

    /// For `/healthz`: `Err` says why the store cannot take writes now.
    pub async fn probe(&self) -> Result<(), String> {
        match self {
            Store::Fs(s) => {
                let s = s.clone();
                match tokio::task::spawn_blocking(move || s.probe_writable()).await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(format!("store is not writable: {e}")),
                    Err(e) => Err(format!("store probe failed: {e}")),
                }
            }
            Store::S3(s) => s
                .probe()
                .await
                .map_err(|e| format!("bucket is not writable: {e}")),
        }
    }

    /// Quarantine retention; returns the bytes still held.
    pub async fn clean_quarantine(&self) -> io::Result<u64> {
        match self {
            Store::Fs(s) => {
                let s = s.clone();
                tokio::task::spawn_blocking(move || s.clean_quarantine())
                    .await
                    .map_err(io::Error::other)?
            }
            Store::S3(s) => s
                .clean_quarantine()
                .await
                .map_err(StoreUnavailable::into_io),
        }
    }

    /// The bytes the quarantine holds after a rejected upload was kept. The S3 quarantine
    /// applied its retention when it kept the upload; the fs one applies it now.
    pub(crate) async fn quarantine_held(&self) -> Option<u64> {
        match self {
            Store::S3(s) => Some(s.quarantine_bytes()),
            Store::Fs(_) => self.clean_quarantine().await.ok(),
        }
    }

    /// What `/healthz` names as the store.
    pub fn describe(&self) -> String {
        match self {
            Store::Fs(s) => format!("fs {}", s.root().display()),
            Store::S3(s) => s.describe(),
        }
    }
}

/// The store's series, read at scrape time.
pub(crate) struct Collector(pub(crate) Store);

impl std::fmt::Debug for Collector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("store::Collector")
    }
}

impl prometheus_client::collector::Collector for Collector {
    fn encode(
        &self,
        mut enc: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        match &self.0 {
            Store::S3(s) => {
                s.metrics().encode(&mut enc)?;
                resume_series(&mut enc, s.resumable_bytes(), s.resumed_total())
            }
            Store::Fs(s) => {
                crate::metrics::counter(
                    &mut enc,
                    "cis490_receiver_quarantine_scans",
                    "Listings of the quarantine directory (at start, then at most hourly)",
                    s.quarantine_scans(),
                )?;
                let g = s.group_counts();
                crate::metrics::counter(
                    &mut enc,
                    "cis490_receiver_commit_groups",
                    "Flushes of the group commit: each fsyncs the directories of its uploads once, then index.jsonl once",
                    g.groups,
                )?;
                crate::metrics::counter(
                    &mut enc,
                    "cis490_receiver_commit_rows",
                    "Index rows made durable by the group commit",
                    g.rows,
                )?;
                crate::metrics::counter(
                    &mut enc,
                    "cis490_receiver_commit_dir_fsyncs",
                    "Directory fsyncs made by the group commit",
                    g.dir_fsyncs,
                )?;
                let r = s.resumes();
                resume_series(&mut enc, r.held_bytes(), r.resumed_total())
            }
        }
    }
}

/// The series of SPEC §13: bytes held for resumes, and resumed uploads since start.
fn resume_series(
    enc: &mut prometheus_client::encoding::DescriptorEncoder,
    held: u64,
    resumed: u64,
) -> Result<(), std::fmt::Error> {
    crate::metrics::gauge(
        enc,
        "cis490_receiver_resumable_bytes",
        "Bytes of interrupted uploads held for a resume",
        i64::try_from(held).unwrap_or(i64::MAX),
    )?;
    crate::metrics::counter(
        enc,
        "cis490_receiver_resumed",
        "Uploads resumed from a held prefix since start",
        resumed,
    )
}

/// The store as the maintenance commands (`reindex`, `export-index`, `scrub`) reach it: not
/// opened as a serving receiver opens it (no start-up repair, no index held in memory), so they
/// can run beside a receiver; `reindex` of the fs store still takes its lock, as it rewrites the
/// index.
pub(crate) enum Offline {
    Fs {
        root: std::path::PathBuf,
        max_uncompressed: u64,
    },
    S3(S3Store),
}

impl Offline {
    /// Rebuilds the index from what is stored: (rows written, entries skipped).
    pub(crate) async fn reindex(&self) -> anyhow::Result<Reindexed> {
        match self {
            Offline::Fs {
                root,
                max_uncompressed,
            } => fs::reindex(root, *max_uncompressed).map(|(ok, bad)| Reindexed {
                ok,
                bad,
                unit: "file(s)",
            }),
            Offline::S3(s) => s.reindex().await.map(|(ok, bad)| Reindexed {
                ok,
                bad,
                unit: "object(s)",
            }),
        }
    }

    /// Writes every index row to `out` as JSON lines.
    pub(crate) async fn export_index(&self, out: &mut (dyn Write + Send)) -> anyhow::Result<()> {
        match self {
            Offline::Fs { root, .. } => fs::export_index(root, out),
            Offline::S3(s) => s.export_index(out).await,
        }
    }

    /// How error messages name the store.
    pub(crate) fn describe(&self) -> String {
        match self {
            Offline::Fs { root, .. } => root.display().to_string(),
            Offline::S3(s) => s.describe(),
        }
    }
}

/// What `reindex` did; `unit` names what was skipped (files or objects).
pub(crate) struct Reindexed {
    pub(crate) ok: usize,
    pub(crate) bad: usize,
    pub(crate) unit: &'static str,
}
