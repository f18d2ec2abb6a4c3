//! The upload lanes through the real work loop (`Shipper::once`) against an HTTPS receiver
//! that holds every PUT at a gate, so the test sees how many uploads the shipper has on the
//! wire at once: small (in-memory) episodes fill the small lane's total, outbox tarballs keep
//! to `concurrency`, and `concurrency = 1` stays one upload at a time.

use std::fs;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::in_hand::SMALL_LANE_TOTAL;
use super::model_tests::{https_server, shipper_with, write_meta};
use crate::queue::IN_MEMORY_MAX;
use crate::test_bytes::noise;

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// What the receiver saw.
#[derive(Default)]
struct Gate {
    /// PUTs between their headers and their answer, all of them and those over 1 MiB.
    in_flight: AtomicUsize,
    large_in_flight: AtomicUsize,
    most: AtomicUsize,
    most_large: AtomicUsize,
    stored: AtomicUsize,
    /// Once open, PUTs are answered at once.
    open: AtomicBool,
    changed: Notify,
}

/// Holds each PUT until `opens_at` are in flight together, or `hold` has passed since the
/// first; from then on the gate stays open. `check` is answered 204.
async fn gated_receiver(
    gate: Arc<Gate>,
    opens_at: usize,
    hold: Duration,
) -> (String, rustls::ClientConfig) {
    let first: Arc<std::sync::OnceLock<tokio::time::Instant>> = Arc::default();
    https_server(move |req: http::Request<hyper::body::Incoming>| {
        let (gate, first) = (gate.clone(), first.clone());
        async move {
            if req.uri().path().ends_with("/check") {
                return Ok(http::Response::builder()
                    .status(204)
                    .body(Full::new(Bytes::new()))
                    .unwrap());
            }
            let large = req
                .headers()
                .get(http::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
                .is_some_and(|n| n > IN_MEMORY_MAX);
            let deadline = *first.get_or_init(|| tokio::time::Instant::now() + hold);
            let now_in = gate.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            gate.most.fetch_max(now_in, Ordering::SeqCst);
            if large {
                let l = gate.large_in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                gate.most_large.fetch_max(l, Ordering::SeqCst);
            }
            if now_in >= opens_at {
                gate.open.store(true, Ordering::SeqCst);
            }
            gate.changed.notify_waiters();
            loop {
                let changed = gate.changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                if gate.open.load(Ordering::SeqCst) {
                    break;
                }
                if tokio::time::timeout_at(deadline, changed).await.is_err() {
                    gate.open.store(true, Ordering::SeqCst);
                    gate.changed.notify_waiters();
                    break;
                }
            }
            let body = req.into_body().collect().await.map_err(|e| e.to_string())?;
            let _ = body.to_bytes();
            gate.in_flight.fetch_sub(1, Ordering::SeqCst);
            if large {
                gate.large_in_flight.fetch_sub(1, Ordering::SeqCst);
            }
            gate.stored.fetch_add(1, Ordering::SeqCst);
            Ok(http::Response::builder()
                .status(201)
                .body(Full::new(Bytes::from_static(br#"{"status":"stored"}"#)))
                .unwrap())
        }
    })
    .await
}

/// Writes `large` episodes over 1 MiB (incompressible), then `small` ones of 2 KiB, oldest
/// first in that order.
fn write_episodes(data_dir: &Path, large: usize, small: usize) {
    let episodes = data_dir.join("episodes");
    fs::create_dir_all(&episodes).unwrap();
    for i in 0..large + small {
        let d = episodes.join(format!("ep-{i:03}"));
        fs::create_dir(&d).unwrap();
        let n = if i < large {
            IN_MEMORY_MAX + 64 * 1024
        } else {
            2048
        };
        fs::write(d.join("frames.bin"), noise(n)).unwrap();
        write_meta(&d, COMMIT);
        // Distinct mtimes, so the queue's order is the order written.
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Ships every episode with `once` at `concurrency`; the gate's figures.
async fn ship(
    concurrency: usize,
    large: usize,
    small: usize,
    opens_at: usize,
    hold: Duration,
) -> Arc<Gate> {
    let dir = tempfile::tempdir().unwrap();
    write_episodes(dir.path(), large, small);
    let gate = Arc::new(Gate::default());
    let (url, tls) = gated_receiver(gate.clone(), opens_at, hold).await;
    let shipper = Arc::new(shipper_with(dir.path(), &url, &tls, concurrency));
    let done = tokio::time::timeout(
        Duration::from_secs(60),
        shipper.once(CancellationToken::new()),
    )
    .await
    .expect("once finishes")
    .unwrap();
    assert!(done, "nothing left to retry");
    let shipped = fs::read_dir(dir.path().join("shipped")).unwrap().count();
    assert_eq!(shipped, large + small, "every episode shipped");
    assert_eq!(gate.stored.load(Ordering::SeqCst), large + small);
    gate
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_episodes_fill_the_small_lane_beyond_concurrency() {
    let gate = ship(
        2,
        0,
        2 * SMALL_LANE_TOTAL,
        SMALL_LANE_TOTAL,
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(
        gate.most.load(Ordering::SeqCst),
        SMALL_LANE_TOTAL,
        "8 small uploads at once with concurrency 2, and never more"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_tarballs_keep_to_concurrency() {
    let gate = ship(2, 5, 0, 3, Duration::from_millis(500)).await;
    assert_eq!(
        gate.most.load(Ordering::SeqCst),
        2,
        "two large uploads at once, not three"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_one_has_no_small_lane() {
    let gate = ship(1, 0, 4, 2, Duration::from_millis(300)).await;
    assert_eq!(gate.most.load(Ordering::SeqCst), 1, "one upload at a time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_uploads_go_beside_large_ones_within_the_total() {
    let gate = ship(2, 2, 12, SMALL_LANE_TOTAL, Duration::from_secs(20)).await;
    assert_eq!(
        gate.most_large.load(Ordering::SeqCst),
        2,
        "both large ones on the wire"
    );
    assert_eq!(
        gate.most.load(Ordering::SeqCst),
        SMALL_LANE_TOTAL,
        "six small ones beside them, and never more than the total"
    );
}
