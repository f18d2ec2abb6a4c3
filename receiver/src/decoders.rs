//! The memory budget of the zstd decoders (`[limits] decoder_memory_bytes`).
//!
//! Each upload's decoder keeps a window buffer as large as the window its frames declare, up to
//! 2^[`crate::ingest::WINDOW_LOG_MAX`] (16 MiB). Without a budget, 64 uploads in flight could hold
//! 64 windows at once: a gigabyte from a hostile host's headers, and a peak RSS that depended on
//! how many decoders happened to overlap. Every decoder now leases its memory before it decodes
//! a frame: what the frame header declares (see [`decoder_bytes`]). One host may hold at most
//! half of the budget unless it holds nothing else, so a host that drips bodies through many
//! large windows cannot take it all.
//!
//! An upload whose first frame finds no room is not made to wait for the others (on slow links
//! they hold their leases for minutes): on the fs store its body is written to its temp file as
//! it arrives, undecoded, and validated from there once whole, under a lease if one comes free
//! within [`SPOOL_WAIT`], else on the one spare decoder (one at a time; reading back from the
//! page cache is quick). So the memory is bounded by the budget plus one decoder, and no upload
//! is refused for want of it. Where a body cannot be read back (a resumed upload's part file,
//! the S3 store), or when a later frame of a streaming upload declares a larger window than
//! leased, the upload waits up to [`WAIT`], then is answered 503 `overloaded`, which the shipper
//! retries.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

/// Default of `[limits] decoder_memory_bytes`.
pub const DEFAULT_BUDGET: u64 = 24 << 20;
/// Smallest `[limits] decoder_memory_bytes` accepted.
pub const MIN_BUDGET: u64 = 4 << 20;
/// Longest wait for a lease before the upload is answered 503.
pub const WAIT: Duration = Duration::from_secs(10);
/// Longest wait of a body written whole for a lease before it takes the spare decoder.
pub const SPOOL_WAIT: Duration = Duration::from_secs(1);
/// What a decoder allocates besides its window: the context with its entropy tables and literal
/// buffer, the input block buffer and the reader buffer in front of it.
pub const DECODER_FIXED_BYTES: u64 = 384 << 10;
/// zstd's largest block.
const BLOCK_MAX: u64 = 128 << 10;

/// Bytes a streaming decoder holds for a frame with this window (and content size, when the
/// frame header gives one): its window buffer (a block and the copy margins beyond the window,
/// never more than the whole content) plus [`DECODER_FIXED_BYTES`].
pub fn decoder_bytes(window: u64, content_size: Option<u64>) -> u64 {
    let ring = window + window.min(BLOCK_MAX) + 64;
    let buffer = match content_size {
        Some(c) => ring.min(c),
        None => ring,
    };
    buffer + DECODER_FIXED_BYTES
}

/// All leases of one receiver.
#[derive(Debug)]
pub struct DecoderBudget {
    total: u64,
    state: Mutex<Held>,
    freed: Condvar,
    /// `cis490_receiver_decoder_memory_bytes`: leased now.
    leased: Gauge,
    /// `cis490_receiver_decoder_memory_refused_total`: uploads answered 503 for want of room.
    refused: Counter,
    /// `cis490_receiver_decoder_memory_spooled_total`: bodies written whole, validated after.
    spooled: Counter,
    /// The decoder of bodies validated after they were written, when no lease came free.
    spare: Mutex<()>,
}

#[derive(Debug, Default)]
struct Held {
    all: u64,
    by_host: HashMap<String, u64>,
}

/// The decoder memory one upload holds; returned to the budget when dropped.
#[derive(Debug)]
pub struct DecoderLease {
    budget: Arc<DecoderBudget>,
    host: String,
    bytes: u64,
}

/// No room in the budget within [`WAIT`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the receiver's decoders hold their memory budget ({total} bytes, limits.decoder_memory_bytes); {wanted} more bytes did not come free within {waited_s} s")]
pub struct Busy {
    pub total: u64,
    pub wanted: u64,
    pub waited_s: u64,
}

impl DecoderBudget {
    pub fn new(total: u64) -> Arc<Self> {
        Self::with_metrics(
            total,
            Gauge::default(),
            Counter::default(),
            Counter::default(),
        )
    }

    /// A budget that reports what is leased in `leased`, and counts refusals in `refused` and
    /// bodies validated after they were written in `spooled`.
    pub fn with_metrics(
        total: u64,
        leased: Gauge,
        refused: Counter,
        spooled: Counter,
    ) -> Arc<Self> {
        Arc::new(DecoderBudget {
            total: total.max(1),
            state: Mutex::new(Held::default()),
            freed: Condvar::new(),
            leased,
            refused,
            spooled,
            spare: Mutex::new(()),
        })
    }

    /// A lease of `want` bytes for `host` if it fits now.
    pub fn try_lease(self: &Arc<Self>, host: &str, want: u64) -> Option<DecoderLease> {
        let mut lease = self.lease(host);
        lease.take(want, Duration::ZERO).ok().map(|()| lease)
    }

    /// Counts a body that found no room and is written whole before it is validated.
    pub fn spooling(&self) {
        self.spooled.inc();
    }

    /// The spare decoder: held by one validation of a written body at a time.
    pub fn spare(&self) -> MutexGuard<'_, ()> {
        self.spare.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn report(&self, held: &Held) {
        self.leased.set(i64::try_from(held.all).unwrap_or(i64::MAX));
    }

    fn lock(&self) -> MutexGuard<'_, Held> {
        // A panic while holding this lock leaves only counters behind; keep using them.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Bytes leased now.
    pub fn held(&self) -> u64 {
        self.lock().all
    }

    pub fn total(&self) -> u64 {
        self.total
    }

    /// An empty lease for an upload from `host`; it grows with [`DecoderLease::grow`].
    pub fn lease(self: &Arc<Self>, host: &str) -> DecoderLease {
        DecoderLease {
            budget: self.clone(),
            host: host.to_string(),
            bytes: 0,
        }
    }

    /// Whether `extra` more bytes fit for a lease of `host` that holds `own` now.
    fn fits(&self, held: &Held, host: &str, own: u64, extra: u64) -> bool {
        if held.all == own {
            // Nobody else holds anything: a lease as large as the whole budget still runs.
            return true;
        }
        if held.all + extra > self.total {
            return false;
        }
        let host_held = held.by_host.get(host).copied().unwrap_or(0);
        host_held == own || host_held + extra <= self.total / 2
    }
}

impl DecoderLease {
    /// Bytes this lease holds.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Grows the lease to `want` bytes (capped at the budget), waiting up to `wait` for room;
    /// a refusal is counted (the upload is answered 503).
    /// A lease never shrinks: a decoder keeps the largest buffer it has needed.
    pub fn grow(&mut self, want: u64, wait: Duration) -> Result<(), Busy> {
        let r = self.take(want, wait);
        if r.is_err() {
            self.budget.refused.inc();
        }
        r
    }

    /// [`DecoderLease::grow`] without counting a refusal (the caller has another way).
    pub fn take(&mut self, want: u64, wait: Duration) -> Result<(), Busy> {
        let budget = self.budget.clone();
        let want = want.min(budget.total);
        if want <= self.bytes {
            return Ok(());
        }
        let extra = want - self.bytes;
        let deadline = Instant::now() + wait;
        let mut held = budget.lock();
        while !budget.fits(&held, &self.host, self.bytes, extra) {
            let now = Instant::now();
            if now >= deadline {
                return Err(Busy {
                    total: budget.total,
                    wanted: extra,
                    waited_s: wait.as_secs(),
                });
            }
            held = budget
                .freed
                .wait_timeout(held, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        held.all += extra;
        *held.by_host.entry(self.host.clone()).or_insert(0) += extra;
        budget.report(&held);
        self.bytes = want;
        Ok(())
    }
}

impl Drop for DecoderLease {
    fn drop(&mut self) {
        if self.bytes == 0 {
            return;
        }
        let mut held = self.budget.lock();
        held.all = held.all.saturating_sub(self.bytes);
        if let Some(h) = held.by_host.get_mut(&self.host) {
            *h = h.saturating_sub(self.bytes);
            if *h == 0 {
                held.by_host.remove(&self.host);
            }
        }
        self.budget.report(&held);
        drop(held);
        self.budget.freed.notify_all();
    }
}

/// Reads the start of `body` until the first frame header is complete (or 64 KiB have come,
/// or the body ended): those bytes, and the decoder memory that frame needs (0 when the bytes
/// do not make a frame header; the validator then says why).
pub fn first_frame(body: &mut impl std::io::Read) -> std::io::Result<(Vec<u8>, u64)> {
    let mut head = Vec::new();
    let mut scanner = crate::zframes::FrameScanner::new();
    let mut buf = [0u8; 16 << 10];
    while scanner.decoder_bytes == 0 && head.len() < 64 << 10 {
        let n = match body.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        head.extend_from_slice(&buf[..n]);
        if scanner.feed(&buf[..n]).is_err() {
            break;
        }
    }
    Ok((head, scanner.decoder_bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const NOW: Duration = Duration::ZERO;

    #[test]
    fn the_window_the_content_and_the_fixed_part_are_counted() {
        // Level 3 on a large input: a 2 MiB window.
        assert_eq!(
            decoder_bytes(2 * MIB, None),
            2 * MIB + 128 * 1024 + 64 + DECODER_FIXED_BYTES
        );
        // A 16 KiB episode in one single-segment frame needs only its content.
        assert_eq!(
            decoder_bytes(16 * 1024, Some(16 * 1024)),
            16 * 1024 + DECODER_FIXED_BYTES
        );
        // A window smaller than a block: the block margin is the window's size.
        assert_eq!(decoder_bytes(1024, None), 2048 + 64 + DECODER_FIXED_BYTES);
    }

    #[test]
    fn leases_wait_for_room_and_give_it_back_when_dropped() {
        let b = DecoderBudget::new(10 * MIB);
        let mut a = b.lease("h1");
        let mut c = b.lease("h2");
        a.grow(4 * MIB, NOW).unwrap();
        c.grow(5 * MIB, NOW).unwrap();
        assert_eq!(b.held(), 9 * MIB);
        let mut d = b.lease("h3");
        assert_eq!(b.leased.get(), 9 * MIB as i64);
        let err = d.grow(2 * MIB, NOW).unwrap_err();
        assert_eq!(b.refused.get(), 1);
        assert_eq!(err.wanted, 2 * MIB);
        assert!(err.to_string().contains("limits.decoder_memory_bytes"));
        // Growing counts only the difference, and never shrinks.
        a.grow(5 * MIB, NOW).unwrap();
        a.grow(MIB, NOW).unwrap();
        assert_eq!(a.bytes(), 5 * MIB);
        assert_eq!(b.held(), 10 * MIB);
        drop(c);
        assert_eq!(b.held(), 5 * MIB);
        d.grow(2 * MIB, NOW).unwrap();
        drop(a);
        drop(d);
        assert_eq!(b.held(), 0);
        assert_eq!(b.leased.get(), 0);
    }

    #[test]
    fn a_waiting_lease_is_granted_when_another_ends() {
        let b = DecoderBudget::new(4 * MIB);
        let mut first = b.lease("h1");
        first.grow(4 * MIB, NOW).unwrap();
        let b2 = b.clone();
        let waiter = std::thread::spawn(move || {
            let mut l = b2.lease("h2");
            let t = Instant::now();
            l.grow(3 * MIB, Duration::from_secs(30))
                .map(|()| t.elapsed())
        });
        std::thread::sleep(Duration::from_millis(200));
        drop(first);
        let waited = waiter.join().unwrap().unwrap();
        assert!(waited >= Duration::from_millis(150), "{waited:?}");
        assert_eq!(b.held(), 0);
    }

    #[test]
    fn one_host_holds_at_most_half_unless_it_holds_nothing_else() {
        let b = DecoderBudget::new(32 * MIB);
        let mut big = b.lease("greedy");
        // Its first lease may exceed half the budget: one decoder of the largest window runs.
        big.grow(17 * MIB, NOW).unwrap();
        let mut more = b.lease("greedy");
        assert!(more.grow(MIB, NOW).is_err());
        // Another host still gets the rest.
        let mut other = b.lease("honest");
        other.grow(15 * MIB, NOW).unwrap();
        drop(big);
        // Below half, the greedy host may hold several leases.
        more.grow(8 * MIB, NOW).unwrap();
        let mut third = b.lease("greedy");
        third.grow(8 * MIB, NOW).unwrap();
        let mut fourth = b.lease("greedy");
        assert!(fourth.grow(MIB, NOW).is_err());
    }

    #[test]
    fn the_first_frame_is_read_just_far_enough_to_know_its_decoder() {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
        let mut enc = zstd::stream::Encoder::new(Vec::new(), 3).unwrap();
        enc.window_log(20).unwrap();
        std::io::Write::write_all(&mut enc, &data).unwrap();
        let body = enc.finish().unwrap();
        // A reader that hands out 3 bytes at a time: the header takes a few reads.
        struct Drip<'a>(&'a [u8]);
        impl std::io::Read for Drip<'_> {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                let n = buf.len().min(3).min(self.0.len());
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let mut src = Drip(&body);
        let (head, need) = first_frame(&mut src).unwrap();
        assert_eq!(need, decoder_bytes(1 << 20, None));
        assert!(head.len() < 16, "read {} bytes", head.len());
        assert_eq!(&body[..head.len()], &head[..]);
        // Not a zstd stream: nothing to lease, the bytes are handed on.
        let (head, need) = first_frame(&mut &b"not zstd at all"[..]).unwrap();
        assert_eq!((head.as_slice(), need), (&b"not zstd at all"[..], 0));
    }

    #[test]
    fn try_lease_takes_what_fits_and_counts_no_refusal() {
        let b = DecoderBudget::new(4 * MIB);
        let first = b.try_lease("h1", 3 * MIB).unwrap();
        assert!(b.try_lease("h2", 2 * MIB).is_none());
        assert_eq!(b.refused.get(), 0);
        drop(first);
        assert!(b.try_lease("h2", 2 * MIB).is_some());
    }

    #[test]
    fn a_lease_larger_than_the_budget_runs_alone() {
        let b = DecoderBudget::new(8 * MIB);
        let mut huge = b.lease("h1");
        huge.grow(20 * MIB, NOW).unwrap();
        assert_eq!(huge.bytes(), 8 * MIB);
        let mut small = b.lease("h2");
        assert!(small.grow(1, NOW).is_err());
        drop(huge);
        small.grow(1, NOW).unwrap();
    }
}
