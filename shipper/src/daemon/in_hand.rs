//! What the daemon knows about each episode it has in hand: one [`EpisodeRecord`] per episode in
//! one map, and the rule that decides when a packed episode may start its upload, so that with
//! `concurrency = 1` episodes are stored strictly oldest first (SPEC §2).
//!
//! Uploads go in two lanes: an outbox tarball (over 1 MiB) needs one of the `concurrency`
//! slots; a tarball held in memory only needs room under a higher total ([`Slots`]). A small
//! upload is bound by round trips and fsyncs, not by the link or the CPU, so more of them at
//! once ship more episodes a second without more disk or memory than a few MiB.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::queue::Candidate;

/// Where an episode is in its attempt.
#[derive(Debug)]
enum Phase {
    /// No worker has it: it waits for `retry_at`, or is only remembered for its tarball.
    Idle,
    /// Its worker reads the stamp, waits for a pack slot, packs or hashes an earlier tarball.
    Preparing,
    /// Packed; waiting for its turn to upload.
    Packed,
    /// On the wire.
    Uploading {
        /// In the small lane (an in-memory tarball).
        small: bool,
        /// Body bytes sent, counted by the upload itself.
        progress: Arc<AtomicU64>,
        /// `progress` when the watchdog last looked, and when it last saw it move.
        seen: u64,
        moved_at: Instant,
    },
    /// Answered (or failed); its worker retires, quarantines or keeps it.
    Applying,
}

impl Phase {
    /// Still before its upload: younger episodes wait for it (see [`InHand::upload_turn`]).
    fn before_upload(&self) -> bool {
        matches!(self, Phase::Preparing | Phase::Packed)
    }
}

/// Everything the daemon knows about one episode.
#[derive(Debug)]
pub(crate) struct EpisodeRecord {
    /// The episode directory's mtime: with the id, the queue's order (oldest first).
    mtime: SystemTime,
    phase: Phase,
    /// Failed attempts so far: the exponent of the transient backoff.
    attempts: u32,
    /// Not tried again before this instant.
    retry_at: Option<Instant>,
    /// The tar SHA-256 and length of the outbox tarball this process packed, so a retry does
    /// not hash the tarball again.
    packed: Option<(String, u64)>,
}

impl EpisodeRecord {
    fn new(mtime: SystemTime) -> EpisodeRecord {
        EpisodeRecord {
            mtime,
            phase: Phase::Idle,
            attempts: 0,
            retry_at: None,
            packed: None,
        }
    }

    /// Worth keeping once no worker has it.
    fn remembers_anything(&self) -> bool {
        self.attempts > 0 || self.packed.is_some()
    }
}

#[derive(Debug, Default)]
struct State {
    episodes: HashMap<String, EpisodeRecord>,
    /// `(mtime, id)` of every record still before its upload, oldest first: the first one is
    /// the only episode allowed to take a free upload slot.
    before_upload: BTreeSet<(SystemTime, String)>,
    /// Records in [`Phase::Uploading`], and those of them in the large lane.
    uploading: usize,
    uploading_large: usize,
}

impl State {
    /// The one place a record changes phase, so that `before_upload` and `uploading` always
    /// agree with the records.
    fn set_phase(&mut self, id: &str, phase: Phase) {
        let Some(r) = self.episodes.get_mut(id) else {
            return;
        };
        let key = (r.mtime, id.to_string());
        if r.phase.before_upload() {
            self.before_upload.remove(&key);
        }
        if let Phase::Uploading { small, .. } = r.phase {
            self.uploading -= 1;
            self.uploading_large -= usize::from(!small);
        }
        if phase.before_upload() {
            self.before_upload.insert(key);
        }
        if let Phase::Uploading { small, .. } = phase {
            self.uploading += 1;
            self.uploading_large += usize::from(!small);
        }
        r.phase = phase;
    }

    fn remove(&mut self, id: &str) {
        self.set_phase(id, Phase::Idle);
        self.episodes.remove(id);
    }
}

/// How many uploads may run at once, per lane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Slots {
    /// Uploads of outbox tarballs: `[shipping] concurrency`.
    pub(crate) large: usize,
    /// Uploads of both kinds together: small ones may use what large ones leave of this.
    pub(crate) total: usize,
}

/// Uploads at once when the small lane is full: the receiver's default `[limits]
/// max_uploads_per_host` (SPEC §16), so a fleet on default settings never hears `overloaded`
/// for this.
pub(crate) const SMALL_LANE_TOTAL: usize = 8;

impl Slots {
    /// The lanes for `[shipping] concurrency`. With 1 there is no small lane: one upload at a
    /// time, strictly oldest first, as an operator who set 1 expects.
    pub(crate) fn for_concurrency(concurrency: usize) -> Slots {
        let large = concurrency.max(1);
        let total = if large == 1 {
            1
        } else {
            large.max(SMALL_LANE_TOTAL)
        };
        Slots { large, total }
    }

    fn admits(&self, st: &State, small: bool) -> bool {
        st.uploading < self.total && (small || st.uploading_large < self.large)
    }
}

/// The records of every episode in hand, shared by the work loop, the workers and the watchdog.
#[derive(Debug)]
pub(crate) struct InHand {
    state: Mutex<State>,
    /// Wakes the workers waiting for their upload turn whenever a record changes phase.
    changed: Notify,
    slots: Slots,
}

impl InHand {
    /// At most `slots` uploads at once.
    pub(crate) fn new(slots: Slots) -> InHand {
        InHand {
            state: Mutex::new(State::default()),
            changed: Notify::new(),
            slots,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Invariant: every critical section is a plain map update that cannot panic midway.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Changes the records, then wakes the workers waiting for a turn: any change may be the
    /// one they wait for (a slot freed, an older episode packed or set aside).
    fn update(&self, f: impl FnOnce(&mut State)) {
        f(&mut self.lock());
        self.changed.notify_waiters();
    }

    /// Whether episode `id` may be handed to a worker now: no worker has it and its backoff is over.
    pub(crate) fn available(&self, id: &str, now: Instant) -> bool {
        self.lock()
            .episodes
            .get(id)
            .is_none_or(|r| matches!(r.phase, Phase::Idle) && r.retry_at.is_none_or(|t| t <= now))
    }

    /// A worker takes `c`.
    pub(crate) fn take(&self, c: &Candidate) {
        self.update(|st| {
            let r = st
                .episodes
                .entry(c.id.clone())
                .or_insert_with(|| EpisodeRecord::new(c.mtime));
            if matches!(r.phase, Phase::Idle) {
                // The directory may have been touched since an earlier attempt.
                r.mtime = c.mtime;
            }
            st.set_phase(&c.id, Phase::Preparing);
        });
    }

    /// The worker is done with `id` (whatever the outcome): it no longer holds anything back.
    pub(crate) fn finish(&self, id: &str) {
        self.update(|st| {
            st.set_phase(id, Phase::Idle);
            if st.episodes.get(id).is_some_and(|r| !r.remembers_anything()) {
                st.episodes.remove(id);
            }
        });
    }

    /// `id` left episodes/ (shipped or quarantined): nothing about it is worth keeping.
    pub(crate) fn forget(&self, id: &str) {
        self.update(|st| st.remove(id));
    }

    /// Failed attempts of `id` so far.
    pub(crate) fn attempts(&self, id: &str) -> u32 {
        self.lock().episodes.get(id).map_or(0, |r| r.attempts)
    }

    /// Counts a failed attempt; `id` is not tried again for `delay`.
    pub(crate) fn back_off(&self, id: &str, delay: Duration) {
        let mut st = self.lock();
        if let Some(r) = st.episodes.get_mut(id) {
            r.attempts += 1;
            r.retry_at = Some(Instant::now() + delay);
        }
    }

    /// The outbox tarball this process packed for `id`, if any: tar SHA-256 and length.
    pub(crate) fn packed(&self, id: &str) -> Option<(String, u64)> {
        self.lock().episodes.get(id).and_then(|r| r.packed.clone())
    }

    pub(crate) fn remember_packed(&self, id: &str, sha: &str, len: u64) {
        if let Some(r) = self.lock().episodes.get_mut(id) {
            r.packed = Some((sha.to_string(), len));
        }
    }

    /// Episodes a worker holds right now (the sweep leaves their outbox files alone).
    pub(crate) fn busy(&self) -> HashSet<String> {
        self.lock()
            .episodes
            .iter()
            .filter(|(_, r)| !matches!(r.phase, Phase::Idle))
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Waits until `id` may upload, counting its bytes in `progress`: a slot of its lane is
    /// free (`small`: its tarball is in memory) and no older episode in hand is still before its
    /// upload. Episodes backing off are not in hand, so they hold nobody back; an older one still
    /// packing does, which is what keeps a small episode packed ahead from overtaking it. The
    /// slot is freed when the turn drops.
    pub(crate) async fn upload_turn(
        &self,
        id: &str,
        progress: Arc<AtomicU64>,
        small: bool,
    ) -> UploadTurn<'_> {
        self.update(|st| st.set_phase(id, Phase::Packed));
        loop {
            // Registered before the check, so a change between the check and the wait wakes it.
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            {
                let mut st = self.lock();
                let mtime = st.episodes.get(id).map(|r| r.mtime);
                let first = st.before_upload.first().map(|(t, i)| (*t, i.as_str()));
                let its_turn = match mtime {
                    Some(t) => first.is_none_or(|f| f >= (t, id)),
                    // Invariant: a worker's record lives until the worker finishes.
                    None => true,
                };
                if its_turn && self.slots.admits(&st, small) {
                    st.set_phase(
                        id,
                        Phase::Uploading {
                            small,
                            progress: progress.clone(),
                            seen: progress.load(Ordering::Relaxed),
                            moved_at: Instant::now(),
                        },
                    );
                    drop(st);
                    self.changed.notify_waiters();
                    return UploadTurn {
                        in_hand: self,
                        id: id.to_string(),
                    };
                }
            }
            changed.await;
        }
    }

    /// Whether every upload in flight has moved bytes within `window` (or just started).
    pub(crate) fn uploads_moving(&self, window: Duration) -> bool {
        let now = Instant::now();
        let mut st = self.lock();
        let mut all = true;
        for r in st.episodes.values_mut() {
            if let Phase::Uploading {
                progress,
                seen,
                moved_at,
                ..
            } = &mut r.phase
            {
                let v = progress.load(Ordering::Relaxed);
                if v != *seen {
                    *seen = v;
                    *moved_at = now;
                }
                all &= moved_at.elapsed() < window;
            }
        }
        all
    }
}

/// An upload slot held by one episode; dropping it (the answer came, or the worker was
/// aborted or panicked) frees the slot for the next episode.
pub(crate) struct UploadTurn<'a> {
    in_hand: &'a InHand,
    id: String,
}

impl Drop for UploadTurn<'_> {
    fn drop(&mut self) {
        let id = std::mem::take(&mut self.id);
        self.in_hand.update(|st| st.set_phase(&id, Phase::Applying));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidate(id: &str, age_s: u64) -> Candidate {
        Candidate {
            id: id.into(),
            dir: std::path::PathBuf::from("/nonexistent").join(id),
            mtime: SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 - age_s),
        }
    }

    fn progress() -> Arc<AtomicU64> {
        Arc::new(AtomicU64::new(0))
    }

    /// Whether `fut` completes without waiting.
    async fn ready_now<F: std::future::Future>(fut: F) -> Option<F::Output> {
        tokio::time::timeout(Duration::from_millis(20), fut)
            .await
            .ok()
    }

    #[tokio::test]
    async fn a_younger_packed_episode_waits_for_an_older_one_still_packing() {
        let h = InHand::new(Slots::for_concurrency(1));
        let (old, young) = (candidate("old", 20), candidate("young", 10));
        h.take(&old);
        h.take(&young);
        assert!(
            ready_now(h.upload_turn("young", progress(), false))
                .await
                .is_none(),
            "the older one is still packing"
        );
        let turn = ready_now(h.upload_turn("old", progress(), false)).await;
        assert!(turn.is_some(), "the oldest goes first");
        // One slot: the young one waits for the old one's answer, then goes.
        let h2 = &h;
        let young_turn = async move { h2.upload_turn("young", progress(), false).await };
        tokio::pin!(young_turn);
        assert!(
            ready_now(young_turn.as_mut()).await.is_none(),
            "no free slot"
        );
        drop(turn);
        assert!(ready_now(young_turn).await.is_some());
    }

    #[tokio::test]
    async fn episodes_backing_off_hold_nobody_back() {
        let h = InHand::new(Slots::for_concurrency(1));
        let (old, young) = (candidate("old", 20), candidate("young", 10));
        h.take(&old);
        h.take(&young);
        h.back_off("old", Duration::from_secs(60));
        h.finish("old");
        assert!(!h.available("old", Instant::now()));
        assert_eq!(h.attempts("old"), 1);
        let turn = ready_now(h.upload_turn("young", progress(), false)).await;
        assert!(turn.is_some(), "the old one is set aside, not in the way");
        assert_eq!(h.busy(), HashSet::from(["young".to_string()]));
    }

    #[tokio::test]
    async fn records_are_kept_only_while_they_say_something() {
        let h = InHand::new(Slots::for_concurrency(2));
        let c = candidate("ep", 5);
        h.take(&c);
        assert!(!h.available("ep", Instant::now()), "a worker has it");
        h.finish("ep");
        assert!(h.available("ep", Instant::now()));
        assert!(h.lock().episodes.is_empty(), "nothing to remember");
        h.take(&c);
        h.remember_packed("ep", "abc", 7);
        h.finish("ep");
        assert_eq!(h.packed("ep"), Some(("abc".to_string(), 7)));
        h.forget("ep");
        assert_eq!(h.packed("ep"), None);
        let st = h.lock();
        assert!(st.episodes.is_empty() && st.before_upload.is_empty() && st.uploading == 0);
    }

    #[tokio::test]
    async fn a_stalled_upload_is_seen_and_a_moving_one_is_not() {
        let h = InHand::new(Slots::for_concurrency(2));
        h.take(&candidate("ep", 5));
        let p = progress();
        let _turn = h.upload_turn("ep", p.clone(), false).await;
        let window = Duration::from_millis(50);
        assert!(h.uploads_moving(window), "it just started");
        tokio::time::sleep(window + Duration::from_millis(30)).await;
        assert!(!h.uploads_moving(window), "no byte moved within the window");
        p.fetch_add(1, Ordering::Relaxed);
        assert!(h.uploads_moving(window), "a byte moved since the last look");
    }

    #[test]
    fn the_lanes_follow_concurrency() {
        let s = |c| {
            let s = Slots::for_concurrency(c);
            (s.large, s.total)
        };
        assert_eq!(s(1), (1, 1), "concurrency 1: one upload, no small lane");
        assert_eq!(s(2), (2, SMALL_LANE_TOTAL));
        assert_eq!(s(8), (8, 8));
        assert_eq!(s(16), (16, 16), "never fewer in total than concurrency");
    }

    #[tokio::test]
    async fn small_uploads_use_what_large_ones_leave_of_the_total() {
        let h = InHand::new(Slots::for_concurrency(2));
        let ids: Vec<String> = (0..10).map(|i| format!("ep{i}")).collect();
        for (i, id) in ids.iter().enumerate() {
            h.take(&candidate(id, 100 - i as u64));
        }
        let mut turns = Vec::new();
        for id in &ids[..2] {
            turns.push(
                ready_now(h.upload_turn(id, progress(), false))
                    .await
                    .expect("a large slot"),
            );
        }
        // The third is large too: both large slots are taken, and it is the oldest left, so
        // the small ones behind it wait with it.
        let h2 = &h;
        let third = async move { h2.upload_turn("ep2", progress(), false).await };
        tokio::pin!(third);
        assert!(
            ready_now(third.as_mut()).await.is_none(),
            "no third large upload"
        );
        h.finish("ep2");
        for id in &ids[3..9] {
            turns.push(
                ready_now(h.upload_turn(id, progress(), true))
                    .await
                    .expect("room in the total"),
            );
        }
        assert_eq!(h.lock().uploading, SMALL_LANE_TOTAL);
        let ninth = async move { h2.upload_turn("ep9", progress(), true).await };
        tokio::pin!(ninth);
        assert!(
            ready_now(ninth.as_mut()).await.is_none(),
            "the total is full"
        );
        drop(turns.pop());
        let ninth = ready_now(ninth).await;
        assert!(ninth.is_some(), "a small one finished: room again");
        let st = h.lock();
        assert_eq!((st.uploading, st.uploading_large), (SMALL_LANE_TOTAL, 2));
    }
}
