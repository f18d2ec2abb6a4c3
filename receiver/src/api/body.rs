//! The body pump of a `PUT`: frames from the connection go to the blocking validator through
//! a two-chunk channel, under the idle timeout, the rate floor and the declared length
//! (SPEC §3, §16). However the body ends, the validator learns how.

use std::io::{self, Read};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::slots::HostSlot;
use crate::state::AppState;

/// What the network side tells the validator.
pub(super) enum Chunk {
    Data(Bytes),
    /// The whole body arrived. Without it a closed channel means the request was dropped
    /// (client gone, shutdown), which is not the end of a valid body.
    End,
    Failed(io::Error),
}

/// Two chunks in flight: enough to overlap network and validation, little memory per upload.
pub(super) fn channel() -> (mpsc::Sender<Chunk>, ChannelReader) {
    let (tx, rx) = mpsc::channel::<Chunk>(2);
    let reader = ChannelReader {
        rx,
        cur: Bytes::new(),
        ended: false,
    };
    (tx, reader)
}

/// Feeds the blocking validator from the async body, one chunk at a time.
pub(super) struct ChannelReader {
    rx: mpsc::Receiver<Chunk>,
    cur: Bytes,
    ended: bool,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.cur.is_empty() {
            if self.ended {
                return Ok(0);
            }
            match self.rx.blocking_recv() {
                Some(Chunk::Data(b)) => self.cur = b,
                Some(Chunk::End) => self.ended = true,
                Some(Chunk::Failed(e)) => return Err(e),
                None => {
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        "the request was dropped before its body ended",
                    ));
                }
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur[..n]);
        let _ = self.cur.split_to(n);
        Ok(n)
    }
}

/// Reads `body` into `tx` until it ends, fails, stalls, runs past `length`, or the validator
/// stops taking chunks (it then holds the verdict). The channel is closed on return.
pub(super) async fn pump(
    state: &AppState,
    mut body: Incoming,
    tx: mpsc::Sender<Chunk>,
    length: u64,
    host_slot: &mut HostSlot,
) {
    let idle = Duration::from_secs(state.cfg.limits.body_idle_timeout_s);
    let mut received: u64 = 0;
    let mut rate = RateFloor::new(state.cfg.limits.min_body_bytes_per_s);
    let mut last_frame = Instant::now();
    loop {
        let idle_deadline = last_frame + idle;
        let deadline = idle_deadline.min(Instant::now() + rate.until_next_check());
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) if rate.too_slow(received) => {
                let _ = tx.send(Chunk::Failed(rate.failure())).await;
                return;
            }
            Err(_) if Instant::now() < idle_deadline => continue,
            Err(_) => {
                let _ = tx
                    .send(Chunk::Failed(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no body bytes for {}s", idle.as_secs()),
                    )))
                    .await;
                return;
            }
            Ok(None) => {
                let _ = tx.send(Chunk::End).await;
                return;
            }
            Ok(Some(Err(e))) => {
                let _ = tx
                    .send(Chunk::Failed(io::Error::other(e.to_string())))
                    .await;
                return;
            }
            Ok(Some(Ok(f))) => {
                last_frame = Instant::now();
                f
            }
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        let n = data.len() as u64;
        received += n;
        host_slot.progress(n);
        state.metrics.body_bytes_read.inc_by(n);
        if rate.too_slow(received) {
            let _ = tx.send(Chunk::Failed(rate.failure())).await;
            return;
        }
        if received > length {
            let _ = tx
                .send(Chunk::Failed(io::Error::other(
                    "body is longer than Content-Length",
                )))
                .await;
            return;
        }
        if tx.send(Chunk::Data(data)).await.is_err() {
            // The validator stopped early (a rejection); it holds the verdict.
            return;
        }
    }
}

/// `[limits] min_body_bytes_per_s` (SPEC §16): after a first minute of grace, every 60 s window
/// must bring at least a minute's worth of bytes at that rate.
struct RateFloor {
    min_per_s: u64,
    window_start: Instant,
    window_bytes: u64,
}

const RATE_WINDOW: Duration = Duration::from_secs(60);

impl RateFloor {
    fn new(min_per_s: u64) -> Self {
        RateFloor {
            min_per_s,
            // The first window opens after the grace minute.
            window_start: Instant::now() + RATE_WINDOW,
            window_bytes: 0,
        }
    }

    /// How long until the current window closes (at least a millisecond).
    fn until_next_check(&self) -> Duration {
        if self.min_per_s == 0 {
            return Duration::from_secs(86400);
        }
        (self.window_start + RATE_WINDOW)
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    }

    /// Checks the window that has closed, if any, and opens the next.
    fn too_slow(&mut self, received: u64) -> bool {
        let now = Instant::now();
        if self.min_per_s == 0 || now < self.window_start + RATE_WINDOW {
            if now < self.window_start {
                self.window_bytes = received;
            }
            return false;
        }
        let got = received - self.window_bytes;
        if got < self.min_per_s.saturating_mul(RATE_WINDOW.as_secs()) {
            return true;
        }
        self.window_start = now;
        self.window_bytes = received;
        false
    }

    fn failure(&self) -> io::Error {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "the body arrived slower than {} bytes/s over {}s (limits.min_body_bytes_per_s)",
                self.min_per_s,
                RATE_WINDOW.as_secs()
            ),
        )
    }
}
