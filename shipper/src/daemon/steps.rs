//! One episode's attempt in named steps: read its stamp, get its tarball (reuse or pack), wait
//! for its upload turn and send it, then apply the answer (retire, quarantine or keep).
//!
//! Every event names its episode with an explicit `episode = %id` field, not through an
//! `#[instrument]` span: the fmt subscriber prints span fields as a `attempt{episode=..}:`
//! prefix, not as the `episode=<id>` key SPEC §10 asks of each line and doctor and the tests read.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use cis490_common::{ErrorCode, Reason};

use super::{usage, Shipper, Verdict};
use crate::adapt::Span;
use crate::pack::PackError;
use crate::queue::{read_stamp, Candidate, QuarantineReason, Stamp, Tarball};
use crate::retry::Setback;
use crate::transport::{Outcome, Shipment};

/// A step that ends the attempt early says how it ended.
type Step<T> = Result<T, Verdict>;

/// A string field of the receiver's JSON answer, or "".
fn answer_field(body: &Option<Value>, name: &str) -> String {
    body.as_ref()
        .and_then(|b| b.get(name))
        .and_then(|m| m.as_str())
        .unwrap_or("")
        .to_string()
}

impl Shipper {
    /// One episode, start to finish.
    pub(super) async fn attempt(&self, c: Candidate) -> Verdict {
        let commit = match self.stamp(&c) {
            Ok(commit) => commit,
            Err(verdict) => return verdict,
        };
        let (tar_sha256, tarball, fresh_level) = match self.tarball(&c, &commit).await {
            Ok(packed) => packed,
            Err(verdict) => return verdict,
        };
        let shipment = Shipment {
            host_id: self.cfg.host_id.clone(),
            episode_id: c.id.clone(),
            commit: commit.clone(),
            tar_sha256,
            tarball,
            progress: Arc::new(AtomicU64::new(0)),
        };
        let outcome = self.upload(&shipment, fresh_level).await;
        self.apply(&c.id, &commit, &shipment, outcome)
    }

    /// The commit in `meta.json`. Missing: the producer is not done (kept, no backoff); unusable:
    /// it can never be admitted (quarantined as `unstamped`).
    fn stamp(&self, c: &Candidate) -> Step<String> {
        let id = &c.id;
        match read_stamp(&c.dir) {
            Stamp::Commit(commit) => Ok(commit.to_string()),
            Stamp::Missing => Err(Verdict::Kept),
            Stamp::Bad(why) => {
                self.metrics.rejected(Reason::Unstamped.as_str());
                tracing::error!(event = "ship_rejected", episode = %id, reason = Reason::Unstamped.as_str(), detail = %why, "meta.json has no usable code_version.commit");
                Err(self.quarantine(id, Reason::Unstamped, None, None, None))
            }
        }
    }

    /// The tar SHA-256 and the tarball: the outbox file this process packed before, else one
    /// left by an earlier run (hashed again), else a fresh pack (then also its zstd level).
    async fn tarball(&self, c: &Candidate, commit: &str) -> Step<(String, Tarball, Option<i32>)> {
        let id = &c.id;
        let path = self.queue.tarball(id);
        if let Some((sha, len)) = self.in_hand.packed(id).filter(|_| path.exists()) {
            return Ok((sha, Tarball::File { path, len }, None));
        }
        // Re-hashing a tarball left by an earlier run costs as much disk and CPU as a pack, so it
        // takes a pack slot too (after a restart every episode in hand may have one).
        let _packing = self
            .pack_slots
            .acquire()
            .await
            .expect("invariant: the pack semaphore is never closed");
        let queue = self.queue.clone();
        let compression = self.compression_now();
        let cc = c.clone();
        let packed = tokio::task::spawn_blocking(move || match queue.existing_tarball(&cc.id) {
            Some((sha, len)) => {
                let path = queue.tarball(&cc.id);
                Ok((sha, Tarball::File { path, len }, None))
            }
            None => {
                let start = usage();
                queue.pack(&cc, compression).map(|(p, t)| {
                    let span = Span {
                        start,
                        end: usage(),
                    };
                    (p.tar_sha256, t, Some((p.tar_bytes, span)))
                })
            }
        })
        .await;
        match packed {
            Ok(Ok((sha, tarball, fresh))) => {
                // Only outbox files are worth remembering: a retry of an in-memory tarball packs
                // the (small) episode again.
                if let Tarball::File { len, .. } = &tarball {
                    self.in_hand.remember_packed(id, &sha, *len);
                }
                if let Some((tar_bytes, span)) = fresh {
                    let body = tarball.len();
                    self.adapt(|a| a.packed(compression.level, tar_bytes, body, span));
                }
                Ok((sha, tarball, fresh.map(|_| compression.level)))
            }
            Ok(Err(e @ (PackError::Unsupported { .. } | PackError::NonUtf8 { .. }))) => {
                self.metrics.rejected(Reason::UnsupportedEntry.as_str());
                tracing::error!(event = "ship_rejected", episode = %id, reason = Reason::UnsupportedEntry.as_str(), error = %e, "episode holds an entry that cannot be shipped");
                Err(self.quarantine(
                    id,
                    Reason::UnsupportedEntry,
                    None,
                    None,
                    Some(commit.into()),
                ))
            }
            Ok(Err(e)) => {
                let delay = self.keep(id, Setback::Transient { retry_after: None });
                self.metrics.transient_error();
                tracing::warn!(event = "ship_transient", episode = %id, error = %e, retry_in_s = delay.as_secs(), "failed to pack; will retry");
                Err(Verdict::Kept)
            }
            Err(e) => {
                let delay = self.keep(id, Setback::Transient { retry_after: None });
                self.metrics.transient_error();
                tracing::error!(event = "ship_transient", episode = %id, error = %e, retry_in_s = delay.as_secs(), "packing task failed; will retry");
                Err(Verdict::Kept)
            }
        }
    }

    /// Waits for the episode's turn (oldest first, a free upload slot), then sends it. The slot
    /// is freed on return: the next upload may start while this one is retired or quarantined.
    /// A whole body stored (201) from a fresh pack at `fresh_level` is the level controller's
    /// evidence of the link.
    async fn upload(&self, s: &Shipment, fresh_level: Option<i32>) -> Outcome {
        let _turn = self
            .in_hand
            .upload_turn(
                &s.episode_id,
                s.progress.clone(),
                matches!(s.tarball, Tarball::Memory(_)),
            )
            .await;
        let _in_flight = self.metrics.upload_in_flight(s.tarball.len());
        let was_resumed = AtomicBool::new(false);
        let resumed = |offset: u64| {
            was_resumed.store(true, Ordering::Relaxed);
            self.metrics.resumed(offset);
            tracing::info!(event = "ship_resumed", episode = %s.episode_id, offset, bytes = s.tarball.len(), "continuing an interrupted upload where the receiver holds it");
        };
        let start = usage();
        let outcome = self.transport.ship(s, &resumed).await;
        if let (Some(level), Outcome::Stored { status: 201, .. }) = (fresh_level, &outcome) {
            if !was_resumed.load(Ordering::Relaxed) {
                let span = Span {
                    start,
                    end: usage(),
                };
                self.adapt(|a| a.sent(level, s.tarball.len(), span));
            }
        }
        outcome
    }

    /// The answer as a queue transition (SPEC §3's last column).
    fn apply(&self, id: &str, commit: &str, s: &Shipment, outcome: Outcome) -> Verdict {
        match outcome {
            Outcome::Stored { status, .. } => self.retire(id, status, s),
            Outcome::Fatal {
                reason,
                status,
                body,
            } => {
                self.metrics.rejected(reason.as_str());
                if reason == Reason::CommitNotInWindow {
                    let remediation = answer_field(&body, "remediation");
                    tracing::error!(
                        event = "ship_rejected",
                        episode = %id,
                        status,
                        reason = reason.as_str(),
                        commit,
                        remediation = ?remediation,
                        "this lab host's code is out of date; run on this host:\n{remediation}"
                    );
                } else {
                    let message = answer_field(&body, "message");
                    tracing::error!(event = "ship_rejected", episode = %id, status, reason = reason.as_str(), message = %message, "receiver refused the episode");
                }
                self.quarantine(id, reason, Some(status), body, Some(commit.to_string()))
            }
            Outcome::Auth { status, body } => {
                let delay = self.keep(id, Setback::Refused);
                let message = answer_field(&body, "message");
                let code = if status == 401 {
                    ErrorCode::Unauthorized
                } else {
                    ErrorCode::Forbidden
                };
                self.metrics.rejected(code.as_str());
                tracing::error!(event = "ship_rejected", episode = %id, status, reason = code.as_str(), message = %message, retry_in_s = delay.as_secs(), "receiver refused this host's credentials; check the certificate and token");
                Verdict::Kept
            }
            Outcome::Transient {
                detail,
                retry_after,
            } => {
                let delay = self.keep(id, Setback::Transient { retry_after });
                self.metrics.transient_error();
                tracing::warn!(event = "ship_transient", episode = %id, detail = %detail, retry_in_s = delay.as_secs_f64(), "transient failure; will retry");
                Verdict::Kept
            }
        }
    }

    /// Transition *retire* after a 200/201.
    fn retire(&self, id: &str, status: u16, s: &Shipment) -> Verdict {
        match self.queue.retire(id) {
            Ok(dest) => {
                self.in_hand.forget(id);
                self.metrics
                    .shipped(s.tarball.len(), std::time::SystemTime::now());
                tracing::info!(event = "shipped", episode = %id, status, bytes = s.tarball.len(), tar_sha256 = %s.tar_sha256, dir = %dest.display(), "episode shipped");
                Verdict::Shipped
            }
            Err(e) => {
                tracing::error!(episode = %id, error = %e, "stored at the receiver but failed to retire; will re-ship (the receiver answers already_stored)");
                self.keep(id, Setback::MoveFailed);
                Verdict::Kept
            }
        }
    }

    /// Transition *quarantine*, with the reason file SPEC §2 describes.
    fn quarantine(
        &self,
        id: &str,
        reason: Reason,
        status: Option<u16>,
        body: Option<Value>,
        commit: Option<String>,
    ) -> Verdict {
        let r = QuarantineReason::new(id, reason, status, body, commit);
        match self.queue.quarantine(id, &r) {
            Ok(dest) => {
                self.in_hand.forget(id);
                tracing::warn!(event = "quarantined", episode = %id, reason = reason.as_str(), status = status.map_or_else(|| "none".to_string(), |s| s.to_string()), dir = %dest.display(), "episode quarantined");
                Verdict::Quarantined
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::NotFound
                    && !self.queue.episodes_dir().join(id).is_dir() =>
            {
                self.in_hand.forget(id);
                tracing::info!(episode = %id, "episode was moved by another process meanwhile");
                Verdict::Quarantined
            }
            Err(e) => {
                tracing::error!(episode = %id, error = %e, "failed to quarantine; will try again");
                self.keep(id, Setback::MoveFailed);
                Verdict::Kept
            }
        }
    }

    /// Keeps the episode in episodes/ and backs it off; returns how long it waits.
    fn keep(&self, id: &str, setback: Setback) -> Duration {
        let delay = self.retry.delay(setback, self.in_hand.attempts(id));
        self.in_hand.back_off(id, delay);
        delay
    }
}
