//! How long a kept episode waits before its next attempt: one policy for every way an attempt
//! can end without a final answer (SPEC §3's last column, plus the shipper's own failures).

use std::time::Duration;

/// Why an attempt ended with the episode kept in episodes/.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Setback {
    /// 429, 5xx, a network or TLS failure, a pack that failed: exponential backoff with full
    /// jitter, never sooner than the receiver's `Retry-After`.
    Transient { retry_after: Option<Duration> },
    /// 401/403: this host's credentials were refused, which no quick retry fixes.
    Refused,
    /// Stored or refused for good, but moving the episode to shipped/ or quarantine/ failed.
    MoveFailed,
    /// The episode's worker panicked.
    WorkerFailed,
}

/// The delays, from `max_backoff_s`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RetryPolicy {
    cap: Duration,
}

impl RetryPolicy {
    /// The first transient retry waits up to this long; each further one doubles it.
    const BASE: Duration = Duration::from_secs(1);
    const MOVE_FAILED: Duration = Duration::from_secs(5);
    const WORKER_FAILED: Duration = Duration::from_secs(30);

    pub(crate) fn new(max_backoff: Duration) -> RetryPolicy {
        RetryPolicy { cap: max_backoff }
    }

    /// The wait after `attempts` earlier failed attempts, with random jitter.
    pub(crate) fn delay(&self, setback: Setback, attempts: u32) -> Duration {
        self.delay_with(setback, attempts, rand::random::<f64>())
    }

    /// [`RetryPolicy::delay`] with the jitter given: `unit` is in `[0, 1]`.
    fn delay_with(&self, setback: Setback, attempts: u32, unit: f64) -> Duration {
        match setback {
            Setback::Transient { retry_after } => {
                let ceiling = Self::BASE
                    .checked_mul(1u32.checked_shl(attempts.min(20)).unwrap_or(u32::MAX))
                    .unwrap_or(self.cap)
                    .min(self.cap);
                let jittered = ceiling.mul_f64(unit.clamp(0.0, 1.0));
                // The receiver's own estimate wins even over the cap: sooner would only be
                // refused again (parse_retry_after bounds it to a day).
                retry_after.map_or(jittered, |ra| jittered.max(ra))
            }
            Setback::Refused => self.cap,
            Setback::MoveFailed => Self::MOVE_FAILED,
            Setback::WorkerFailed => Self::WORKER_FAILED,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn transient_backoff_grows_caps_and_honours_retry_after() {
        let p = RetryPolicy::new(secs(300));
        let t =
            |attempts, unit| p.delay_with(Setback::Transient { retry_after: None }, attempts, unit);
        assert_eq!(t(0, 1.0), secs(1));
        assert_eq!(t(3, 1.0), secs(8));
        assert_eq!(t(30, 1.0), secs(300), "capped");
        assert_eq!(t(5, 0.0), Duration::ZERO, "full jitter reaches zero");
        assert_eq!(t(5, 0.5), secs(16));
        let ra = |retry_after: u64, attempts, unit| {
            p.delay_with(
                Setback::Transient {
                    retry_after: Some(secs(retry_after)),
                },
                attempts,
                unit,
            )
        };
        assert_eq!(ra(42, 0, 0.1), secs(42), "never sooner than Retry-After");
        assert_eq!(ra(2, 5, 1.0), secs(32), "a longer backoff is kept");
        assert_eq!(ra(900, 0, 1.0), secs(900), "Retry-After beyond the cap");
    }

    #[test]
    fn the_other_setbacks_wait_fixed_times() {
        let p = RetryPolicy::new(secs(120));
        for attempts in [0, 7] {
            assert_eq!(p.delay(Setback::Refused, attempts), secs(120));
            assert_eq!(p.delay(Setback::MoveFailed, attempts), secs(5));
            assert_eq!(p.delay(Setback::WorkerFailed, attempts), secs(30));
        }
        let d = p.delay(Setback::Transient { retry_after: None }, 2);
        assert!(d <= secs(4), "{d:?}");
    }
}
