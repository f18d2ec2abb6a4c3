//! Model-based test of the episode lifecycle (issue 19, item 5): random runs of producer
//! writes, scans, attempts answered with every status of SPEC §3 (and a connection cut
//! mid-body), and crashes with restarts, some of them leaving what a crash mid-transition
//! leaves. After every step the data directory is compared with a model of where each episode
//! must be, and with the invariants of SPEC §2.
//!
//! The level: the daemon's own [`Shipper`] (stamp, pack, transport, apply, queue) against an
//! in-process HTTPS receiver whose answer to each attempt the test chooses. A crash drops the
//! `Shipper` and everything it holds in memory; the restart builds a new one over the same
//! directory and runs the housekeeping of a start. Only the work loop's scheduling is left out.
//!
//! `PROPTEST_CASES` raises the number of runs (default [`DEFAULT_CASES`]).

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use proptest::prelude::*;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use super::{Rounds, Shipper};
use crate::config::Config;
use crate::queue::{QuarantineReason, Queue, REASON_FILE};
use crate::test_bytes::noise;
use crate::transport::{Settings, Transport};

const DEFAULT_CASES: u32 = 24;
/// Steps per run, at most.
const MAX_STEPS: usize = 40;
/// Episode ids the producer picks from, so that ids are reused after a retire or a quarantine
/// (which then needs the `.1` suffix of SPEC §2).
const IDS: [&str; 4] = ["ep-a", "ep-b", "ep-c", "ep-d"];
const MAX_BACKOFF_S: u64 = 300;

/// What the producer writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A few small files: packed in memory, sent without a `check`.
    Small,
    /// Over 1 MiB of incompressible bytes: an outbox tarball and a `check` before the PUT.
    Large,
    /// No meta.json yet: not ready, never sent until [`Op::Stamp`].
    Unfinished,
    /// meta.json without a usable commit: quarantined `unstamped` without a request.
    BadMeta,
    /// A symlink inside: quarantined `unsupported_entry` without a request.
    Symlink,
}

/// The receiver's answer to one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Status(u16),
    /// 503 `overloaded` with `Retry-After`.
    RetryAfter(u64),
    /// The connection is dropped after the first piece of the body, with no answer.
    Reset,
}

/// What a crash leaves behind besides the directory as it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Torn {
    Nothing,
    /// A crash while packing: a `.partial` tarball.
    Partial(usize),
    /// A crash after packing, before the upload: a complete outbox tarball.
    Packed(usize),
    /// A crash in *retire* after the tarball went, before the directory moved.
    RetireHalf(usize),
    /// A crash in *quarantine* after the pending reason was written, before the directory moved.
    PendingBefore(usize, u16),
    /// A crash in *quarantine* after the directory moved, before the reason moved inside.
    PendingAfter(usize, u16),
}

#[derive(Debug, Clone)]
enum Op {
    Write {
        slot: usize,
        kind: Kind,
    },
    /// The producer finishes an unfinished episode by writing its meta.json.
    Stamp {
        slot: usize,
    },
    /// The housekeeping at the start of a scan, and the listing.
    Scan,
    /// One attempt of the episode in `slot`; `at_check` answers a large episode's `check`
    /// with `answer` where the receiver would (statuses decided before the body).
    Ship {
        slot: usize,
        answer: Answer,
        at_check: bool,
    },
    Crash(Torn),
}

/// Every status of SPEC §3's table, plus 416 (never a reason to quarantine, SPEC §13).
const STATUSES: [u16; 20] = [
    200, 201, 400, 401, 403, 409, 411, 412, 413, 416, 422, 429, 500, 502, 503, 504, 507, 201, 201,
    200,
];

/// Quarantine statuses a torn quarantine was for.
const FATAL: [u16; 6] = [400, 409, 411, 412, 413, 422];

fn op() -> impl Strategy<Value = Op> {
    let slot = 0..IDS.len();
    let kind = prop_oneof![
        4 => Just(Kind::Small),
        2 => Just(Kind::Large),
        1 => Just(Kind::Unfinished),
        1 => Just(Kind::BadMeta),
        1 => Just(Kind::Symlink),
    ];
    let answer = prop_oneof![
        6 => prop::sample::select(&STATUSES[..]).prop_map(Answer::Status),
        1 => (1u64..120).prop_map(Answer::RetryAfter),
        1 => Just(Answer::Reset),
    ];
    let fatal = prop::sample::select(&FATAL[..]);
    let torn = prop_oneof![
        2 => Just(Torn::Nothing),
        1 => slot.clone().prop_map(Torn::Partial),
        1 => slot.clone().prop_map(Torn::Packed),
        1 => slot.clone().prop_map(Torn::RetireHalf),
        1 => (slot.clone(), fatal.clone()).prop_map(|(s, f)| Torn::PendingBefore(s, f)),
        1 => (slot.clone(), fatal).prop_map(|(s, f)| Torn::PendingAfter(s, f)),
    ];
    prop_oneof![
        4 => (slot.clone(), kind).prop_map(|(slot, kind)| Op::Write { slot, kind }),
        1 => slot.clone().prop_map(|slot| Op::Stamp { slot }),
        2 => Just(Op::Scan),
        8 => (slot, answer, any::<bool>())
            .prop_map(|(slot, answer, at_check)| Op::Ship { slot, answer, at_check }),
        2 => torn.prop_map(Op::Crash),
    ]
}

/// One episode the producer wrote: its serial (also written into the episode as `serial`, so
/// the checks can tell two episodes of the same id apart wherever they are).
#[derive(Debug, Clone)]
struct Written {
    serial: u64,
    id: &'static str,
    kind: Kind,
    commit: String,
    /// The tar SHA-256 the receiver saw for it, once it saw one: it must never change.
    tar_sha256: Option<String>,
}

/// Where the model says an episode is.
#[derive(Debug, Clone, PartialEq)]
enum Place {
    Queued,
    Shipped,
    Quarantined {
        reason: &'static str,
        http_status: Option<u16>,
        receiver_response: Option<Value>,
        commit: Option<String>,
    },
}

#[derive(Default)]
struct Model {
    episodes: Vec<(Written, Place)>,
    next_serial: u64,
}

impl Model {
    /// The episode now in episodes/ under `IDS[slot]`, if any.
    fn queued(&mut self, slot: usize) -> Option<&mut (Written, Place)> {
        self.episodes
            .iter_mut()
            .find(|(w, p)| w.id == IDS[slot] && *p == Place::Queued)
    }
}

// ---- the receiver ----

/// What the fake receiver saw of one request.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    commit: Option<String>,
    tar_sha256: Option<String>,
    /// SHA-256 of the decompressed body, when a whole body arrived.
    body_tar_sha256: Option<String>,
}

#[derive(Default)]
struct Script {
    /// The answer for the next attempt, and whether a `check` gives it.
    plan: Option<(Answer, bool)>,
    seen: Vec<Seen>,
}

fn answer_body(status: u16) -> Option<Value> {
    let (code, message) = match status {
        200 => return Some(json!({"status": "already_stored"})),
        201 => return Some(json!({"status": "stored"})),
        400 => ("malformed_commit", "the commit is not 40 hex digits"),
        401 => ("unauthorized", "bearer token missing or wrong"),
        403 => ("forbidden", "certificate identity differs"),
        409 => ("conflict", "stored with different content"),
        411 => ("length_required", "no Content-Length"),
        412 => ("commit_not_in_window", "commit too old"),
        413 => ("too_large", "over the limit"),
        416 => ("resume_unavailable", "nothing held"),
        422 => ("invalid_content", "not a valid episode"),
        429 => ("overloaded", "too many uploads"),
        503 => ("gate_unavailable", "no commit list"),
        507 => ("insufficient_storage", "disk full"),
        // A proxy in front of the receiver answers these, without JSON.
        _ => return None,
    };
    let mut b = json!({"error": code, "message": message});
    if status == 412 {
        b["remediation"] = json!("cd /opt/cis490 && git pull");
    }
    Some(b)
}

/// Statuses the receiver gives before it reads a body, so a `check` may give them too.
fn before_body(a: Answer) -> bool {
    !matches!(a, Answer::Status(201 | 422 | 416))
}

fn respond(a: Answer) -> http::Response<Full<Bytes>> {
    let (status, retry_after) = match a {
        Answer::Status(s) => (s, None),
        Answer::RetryAfter(s) => (503, Some(s)),
        Answer::Reset => (500, None),
    };
    let body = match (a, answer_body(status)) {
        (Answer::RetryAfter(_), _) => json!({"error": "overloaded", "message": "busy"}).to_string(),
        (_, Some(b)) => b.to_string(),
        (_, None) => "<html>bad gateway</html>".to_string(),
    };
    let mut r = http::Response::builder().status(status);
    if let Some(s) = retry_after {
        r = r.header("retry-after", s.to_string());
    }
    r.body(Full::new(Bytes::from(body))).unwrap()
}

/// A plain HTTPS receiver on 127.0.0.1:0 answering each attempt from `script`.
async fn fake_receiver(script: Arc<Mutex<Script>>) -> (String, rustls::ClientConfig) {
    https_server(move |req| serve(script.clone(), req)).await
}

/// An HTTPS server on 127.0.0.1:0 (a self-signed certificate, no client certificate asked)
/// answering every request with `handle`; the URL and a client config that trusts it.
pub(super) async fn https_server<F, Fut>(handle: F) -> (String, rustls::ClientConfig)
where
    F: Fn(http::Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<http::Response<Full<Bytes>>, String>> + Send + 'static,
{
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
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let Ok(tls) = acceptor.accept(tcp).await else {
                continue;
            };
            let handle = handle.clone();
            let svc = hyper::service::service_fn(handle);
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
    (format!("https://127.0.0.1:{port}"), tls)
}

async fn serve(
    script: Arc<Mutex<Script>>,
    req: http::Request<hyper::body::Incoming>,
) -> Result<http::Response<Full<Bytes>>, String> {
    let (parts, mut body) = req.into_parts();
    let header = |n: &str| {
        parts
            .headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let mut seen = Seen {
        method: parts.method.to_string(),
        path: parts.uri.path().to_string(),
        commit: header(cis490_common::headers::CODE_COMMIT),
        tar_sha256: header(cis490_common::headers::TAR_SHA256),
        body_tar_sha256: None,
    };
    let is_check = seen.path.ends_with("/check");
    let plan = script.lock().unwrap().plan;
    let (answer, at_check) = plan.unwrap_or((Answer::Status(500), false));
    if is_check {
        script.lock().unwrap().seen.push(seen);
        if at_check && before_body(answer) {
            if answer == Answer::Reset {
                return Err("cut during the check".into());
            }
            return Ok(respond(answer));
        }
        return Ok(http::Response::builder()
            .status(204)
            .body(Full::new(Bytes::new()))
            .unwrap());
    }
    if answer == Answer::Reset {
        // One piece of the body, then the connection goes without an answer.
        let _ = body.frame().await;
        script.lock().unwrap().seen.push(seen);
        return Err("cut mid-body".into());
    }
    let bytes = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    if let Ok(tar) = zstd::decode_all(&bytes[..]) {
        seen.body_tar_sha256 = Some(hex::encode(Sha256::digest(&tar)));
    }
    script.lock().unwrap().seen.push(seen);
    Ok(respond(answer))
}

// ---- the shipper side ----

struct World {
    dir: tempfile::TempDir,
    url: String,
    tls: rustls::ClientConfig,
    script: Arc<Mutex<Script>>,
    shipper: Shipper,
}

fn shipper(data_dir: &Path, url: &str, tls: &rustls::ClientConfig) -> Shipper {
    shipper_with(data_dir, url, tls, 1)
}

/// A shipper over `data_dir` sending to `url`, with `[shipping] concurrency` and the
/// defaults otherwise (no settle time, no metrics listener).
pub(super) fn shipper_with(
    data_dir: &Path,
    url: &str,
    tls: &rustls::ClientConfig,
    concurrency: usize,
) -> Shipper {
    let toml = format!(
        r#"
host_id = "labhost-01"
data_dir = "{data}"
[receiver]
url = "{url}"
ca_file = "/nonexistent/ca.pem"
cert_file = "/nonexistent/c.pem"
key_file = "/nonexistent/k.pem"
install_root = "{data}/no-install"
connect_timeout_s = 5
idle_timeout_s = 10
[shipping]
settle_s = 0
concurrency = {concurrency}
max_backoff_s = {MAX_BACKOFF_S}
[metrics]
listen = ""
"#,
        data = data_dir.display()
    );
    let cfg = Config::parse(Path::new("model.toml"), &toml).unwrap();
    let transport = Transport::new(Settings {
        urls: vec![url.to_string()],
        tls: tls.clone(),
        token: None,
        connect_timeout: Duration::from_secs(5),
        idle_timeout: Duration::from_secs(10),
        bandwidth_limit_mbps: 0.0,
        host_commit: None,
    })
    .unwrap();
    Shipper::new(cfg, transport, None)
}

/// Starts as the daemon does: the directories, then the housekeeping of a scan.
fn start(s: &Shipper) {
    s.queue.prepare().unwrap();
    s.housekeeping(&mut Rounds::default());
}

fn commit_of(serial: u64) -> String {
    format!("{:040x}", 0xc0ffee_u64.wrapping_mul(serial + 1))
}

fn write_episode(q: &Queue, w: &Written) {
    let d = q.episodes_dir().join(w.id);
    fs::create_dir(&d).unwrap();
    fs::write(d.join("serial"), w.serial.to_string()).unwrap();
    fs::create_dir(d.join("frames")).unwrap();
    fs::write(d.join("frames").join("0001.bin"), noise(700)).unwrap();
    if w.kind == Kind::Large {
        fs::write(
            d.join("frames").join("big.bin"),
            noise((1 << 20) + 64 * 1024),
        )
        .unwrap();
    }
    match w.kind {
        Kind::Unfinished => {}
        Kind::BadMeta => fs::write(d.join("meta.json"), br#"{"code_version": {}}"#).unwrap(),
        _ => write_meta(&d, &w.commit),
    }
    if w.kind == Kind::Symlink {
        std::os::unix::fs::symlink("/etc/hostname", d.join("link")).unwrap();
    }
}

pub(super) fn write_meta(dir: &Path, commit: &str) {
    fs::write(
        dir.join("meta.json"),
        format!(r#"{{"episode_id":"x","code_version":{{"commit":"{commit}"}}}}"#),
    )
    .unwrap();
}

/// The name the next quarantine of `id` takes, as SPEC §2's suffix rule gives it.
fn quarantine_name(q: &Queue, id: &str) -> String {
    let taken = |n: &str| {
        q.quarantine_dir().join(n).exists()
            || q.quarantine_dir()
                .join(format!(".{n}.reason.pending"))
                .exists()
    };
    std::iter::once(id.to_string())
        .chain((1..).map(|k| format!("{id}.{k}")))
        .find(|n| !taken(n))
        .unwrap()
}

fn reason_of(status: u16) -> &'static str {
    match status {
        400 | 411 => "malformed_request",
        409 => "conflict",
        412 => "commit_not_in_window",
        413 => "too_large",
        422 => "invalid_content",
        _ => unreachable!("{status} is not a quarantine status"),
    }
}

impl World {
    fn new(rt: &tokio::runtime::Runtime) -> World {
        let dir = tempfile::tempdir().unwrap();
        let script = Arc::new(Mutex::new(Script::default()));
        let (url, tls) = rt.block_on(fake_receiver(script.clone()));
        let shipper = shipper(dir.path(), &url, &tls);
        start(&shipper);
        World {
            dir,
            url,
            tls,
            script,
            shipper,
        }
    }

    fn q(&self) -> &Queue {
        &self.shipper.queue
    }

    fn step(&mut self, rt: &tokio::runtime::Runtime, m: &mut Model, op: &Op) {
        match *op {
            Op::Write { slot, kind } => {
                if m.queued(slot).is_some() {
                    return;
                }
                let serial = m.next_serial;
                m.next_serial += 1;
                let w = Written {
                    serial,
                    id: IDS[slot],
                    kind,
                    commit: commit_of(serial),
                    tar_sha256: None,
                };
                write_episode(self.q(), &w);
                m.episodes.push((w, Place::Queued));
            }
            Op::Stamp { slot } => {
                let dir = self.q().episodes_dir().join(IDS[slot]);
                if let Some((w, _)) = m.queued(slot).filter(|(w, _)| w.kind == Kind::Unfinished) {
                    write_meta(&dir, &w.commit);
                    w.kind = Kind::Small;
                }
            }
            Op::Scan => {
                self.shipper.housekeeping(&mut Rounds::default());
                let listed = self.q().list().unwrap();
                let far = std::time::SystemTime::now() + Duration::from_secs(60);
                for c in listed {
                    let (w, _) = m
                        .episodes
                        .iter()
                        .find(|(w, p)| w.id == c.id && *p == Place::Queued)
                        .unwrap_or_else(|| panic!("{} listed but not queued", c.id));
                    let ready = self.q().is_ready(&c, Duration::ZERO, far);
                    assert_eq!(ready, w.kind != Kind::Unfinished, "{} readiness", c.id);
                }
            }
            Op::Ship {
                slot,
                answer,
                at_check,
            } => self.ship(rt, m, slot, answer, at_check),
            Op::Crash(torn) => {
                self.tear(m, torn);
                // Everything in memory goes; the directory stays.
                self.shipper = shipper(self.dir.path(), &self.url, &self.tls);
                start(&self.shipper);
            }
        }
    }

    fn ship(
        &mut self,
        rt: &tokio::runtime::Runtime,
        m: &mut Model,
        slot: usize,
        answer: Answer,
        at_check: bool,
    ) {
        let Some((w, _)) = m.queued(slot) else {
            return;
        };
        let w = w.clone();
        let c = self
            .q()
            .list()
            .unwrap()
            .into_iter()
            .find(|c| c.id == w.id)
            .expect("a queued episode is listed");
        {
            let mut s = self.script.lock().unwrap();
            s.plan = Some((answer, at_check));
            s.seen.clear();
        }
        let id = w.id;
        let s = &self.shipper;
        s.in_hand.take(&c);
        rt.block_on(s.attempt(c));
        s.in_hand.finish(id);
        let seen = std::mem::take(&mut self.script.lock().unwrap().seen);

        // What the receiver saw.
        let sends = matches!(w.kind, Kind::Small | Kind::Large);
        if !sends {
            assert!(
                seen.is_empty(),
                "{id} ({:?}) must not be sent: {seen:?}",
                w.kind
            );
        }
        let large = w.kind == Kind::Large;
        let check_answers = large && at_check && before_body(answer);
        let put_expected = sends && !check_answers;
        for r in &seen {
            assert_eq!(
                r.path.trim_end_matches("/check"),
                format!("/v1/episodes/labhost-01/{id}")
            );
            assert_eq!(
                r.commit.as_deref(),
                Some(w.commit.as_str()),
                "{id}: commit header"
            );
            let sha = r
                .tar_sha256
                .clone()
                .expect("every upload names its tar SHA-256");
            let entry = &mut m.queued(slot).unwrap().0;
            let first = entry.tar_sha256.get_or_insert(sha.clone());
            assert_eq!(*first, sha, "{id}: the same episode packs to the same tar");
            if let Some(body) = &r.body_tar_sha256 {
                assert_eq!(*body, sha, "{id}: the body is the tar the header names");
            }
        }
        if sends {
            let checks = seen.iter().filter(|r| r.method == "POST").count();
            let puts = seen.iter().filter(|r| r.method == "PUT").count();
            assert_eq!(
                checks,
                usize::from(large),
                "{id}: a check before large bodies only"
            );
            if put_expected {
                assert!(puts >= 1, "{id}: a PUT was expected: {seen:?}");
            } else {
                assert_eq!(puts, 0, "{id}: the check's answer ends the attempt");
            }
        }

        // Where it must be now.
        let place = match w.kind {
            Kind::Unfinished => Place::Queued,
            Kind::BadMeta => Place::Quarantined {
                reason: "unstamped",
                http_status: None,
                receiver_response: None,
                commit: None,
            },
            Kind::Symlink => Place::Quarantined {
                reason: "unsupported_entry",
                http_status: None,
                receiver_response: None,
                commit: Some(w.commit.clone()),
            },
            Kind::Small | Kind::Large => match answer {
                Answer::Status(200 | 201) => Place::Shipped,
                Answer::Status(s @ (400 | 409 | 411 | 412 | 413 | 422)) => Place::Quarantined {
                    reason: reason_of(s),
                    http_status: Some(s),
                    receiver_response: answer_body(s),
                    commit: Some(w.commit.clone()),
                },
                _ => Place::Queued,
            },
        };
        m.queued(slot).unwrap().1 = place.clone();

        // Kept episodes wait as long as the table says.
        if place == Place::Queued {
            let now = Instant::now();
            let not_before = match (w.kind, answer) {
                (Kind::Unfinished, _) => None,
                (_, Answer::RetryAfter(s)) => Some(Duration::from_secs(s)),
                (_, Answer::Status(401 | 403)) => Some(Duration::from_secs(MAX_BACKOFF_S)),
                _ => None,
            };
            if let Some(d) = not_before {
                assert!(
                    !s.in_hand
                        .available(id, now + d - Duration::from_millis(500)),
                    "{id}: retried before {d:?} after {answer:?}"
                );
            }
            if w.kind == Kind::Unfinished {
                assert!(
                    s.in_hand.available(id, now),
                    "{id}: an unfinished episode is not backed off"
                );
            }
        }
    }

    /// Leaves what a crash at that point of a transition leaves, doing the transition's own
    /// steps up to there.
    fn tear(&mut self, m: &mut Model, torn: Torn) {
        let q = self.q().clone();
        let slot = match torn {
            Torn::Nothing => return,
            Torn::Partial(s)
            | Torn::Packed(s)
            | Torn::RetireHalf(s)
            | Torn::PendingBefore(s, _)
            | Torn::PendingAfter(s, _) => s,
        };
        let Some((w, _)) = m.queued(slot) else {
            return;
        };
        let w = w.clone();
        let id = w.id;
        let src = q.episodes_dir().join(id);
        let tarball = q.tarball(id);
        match torn {
            Torn::Nothing => {}
            Torn::Partial(_) => {
                fs::write(
                    q.outbox_dir().join(format!("{id}.tar.zst.partial")),
                    b"torn",
                )
                .unwrap();
            }
            Torn::Packed(_) => {
                if matches!(w.kind, Kind::Small | Kind::Large) {
                    let c = q.list().unwrap().into_iter().find(|c| c.id == id).unwrap();
                    q.pack(&c, crate::pack::Compression::default()).unwrap();
                }
            }
            Torn::RetireHalf(_) => {
                let _ = fs::remove_file(&tarball);
            }
            Torn::PendingBefore(_, status) | Torn::PendingAfter(_, status) => {
                let _ = fs::remove_file(&tarball);
                let name = quarantine_name(&q, id);
                let reason = QuarantineReason::new(
                    id,
                    cis490_common::Reason::parse(reason_of(status)).unwrap(),
                    Some(status),
                    answer_body(status),
                    Some(w.commit.clone()),
                );
                let pending = q.quarantine_dir().join(format!(".{name}.reason.pending"));
                fs::write(&pending, serde_json::to_vec_pretty(&reason).unwrap()).unwrap();
                if let Torn::PendingAfter(..) = torn {
                    fs::rename(&src, q.quarantine_dir().join(&name)).unwrap();
                    m.queued(slot).unwrap().1 = Place::Quarantined {
                        reason: reason_of(status),
                        http_status: Some(status),
                        receiver_response: answer_body(status),
                        commit: Some(w.commit.clone()),
                    };
                }
            }
        }
    }

    /// The data directory against the model and SPEC §2's invariants.
    fn check(&self, m: &Model) {
        let q = self.q();
        let serial_of = |d: &Path| -> u64 {
            fs::read_to_string(d.join("serial"))
                .unwrap_or_else(|e| panic!("{}: {e}", d.display()))
                .parse()
                .unwrap()
        };
        // Every episode directory on disk, by serial, with where it is.
        let mut found: HashMap<u64, (PathBuf, &'static str)> = HashMap::new();
        for (dir, place) in [
            (q.episodes_dir(), "episodes"),
            (q.shipped_dir(), "shipped"),
            (q.quarantine_dir(), "quarantine"),
        ] {
            for e in fs::read_dir(&dir).unwrap() {
                let e = e.unwrap();
                let name = e.file_name().into_string().unwrap();
                assert!(
                    !name.starts_with('.'),
                    "{place}/{name}: nothing hidden is left after a step"
                );
                let serial = serial_of(&e.path());
                let before = found.insert(serial, (e.path(), place));
                assert!(
                    before.is_none(),
                    "episode {serial} is in two places: {before:?} and {place}/{name}"
                );
            }
        }
        assert_eq!(
            found.len(),
            m.episodes.len(),
            "episodes on disk vs written: {found:?}"
        );
        for (w, place) in &m.episodes {
            let (path, where_) = found
                .get(&w.serial)
                .unwrap_or_else(|| panic!("episode {} ({}) is lost", w.serial, w.id));
            let name = path.file_name().unwrap().to_str().unwrap();
            match place {
                Place::Queued => {
                    assert_eq!(*where_, "episodes", "{} ({})", w.id, w.serial);
                    assert_eq!(name, w.id);
                }
                Place::Shipped => {
                    assert_eq!(*where_, "shipped", "{} ({})", w.id, w.serial);
                    assert!(
                        name == w.id || name.starts_with(&format!("{}.", w.id)),
                        "{name}"
                    );
                }
                Place::Quarantined {
                    reason,
                    http_status,
                    receiver_response,
                    commit,
                } => {
                    assert_eq!(*where_, "quarantine", "{} ({})", w.id, w.serial);
                    assert!(
                        name == w.id || name.starts_with(&format!("{}.", w.id)),
                        "{name}"
                    );
                    let r: QuarantineReason =
                        serde_json::from_slice(&fs::read(path.join(REASON_FILE)).unwrap())
                            .unwrap_or_else(|e| panic!("{name}/{REASON_FILE}: {e}"));
                    assert_eq!(r.episode_id, w.id);
                    assert_eq!(r.reason, *reason, "{name}");
                    assert_eq!(r.http_status, *http_status, "{name}");
                    assert_eq!(r.receiver_response, *receiver_response, "{name}");
                    assert_eq!(r.commit, *commit, "{name}");
                    assert!(
                        r.quarantined_at.ends_with('Z') && r.quarantined_at.contains('T'),
                        "{name}: quarantined_at {:?} is RFC 3339 UTC",
                        r.quarantined_at
                    );
                }
            }
        }
        // outbox/: complete tarballs only, each of an episode still in episodes/.
        for e in fs::read_dir(q.outbox_dir()).unwrap() {
            let name = e.unwrap().file_name().into_string().unwrap();
            let id = name
                .strip_suffix(".tar.zst")
                .unwrap_or_else(|| panic!("outbox/{name}: only complete tarballs after a step"));
            assert!(
                q.episodes_dir().join(id).is_dir(),
                "outbox/{name} without its episode"
            );
        }
    }
}

fn run(ops: &[Op]) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut world = World::new(&rt);
    let mut model = Model::default();
    for op in ops {
        world.step(&rt, &mut model, op);
        world.check(&model);
    }
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_CASES)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        // Shrinking replays whole runs; a few hundred are plenty to reach a short one.
        max_shrink_iters: 512,
        ..ProptestConfig::default()
    })]

    #[test]
    fn the_queue_follows_its_model(ops in prop::collection::vec(op(), 1..MAX_STEPS)) {
        run(&ops);
    }
}

/// One run through every kind of step, so a model mistake shows without proptest's luck.
#[test]
fn a_run_through_every_step() {
    use Answer::*;
    let ship = |slot, answer, at_check| Op::Ship {
        slot,
        answer,
        at_check,
    };
    let w = |slot, kind| Op::Write { slot, kind };
    let mut ops = vec![
        w(0, Kind::Small),
        w(1, Kind::Large),
        w(2, Kind::Unfinished),
        w(3, Kind::BadMeta),
        Op::Scan,
        ship(0, Reset, false),
        ship(1, Reset, false),
        ship(1, RetryAfter(30), true),
        ship(2, Status(201), false),
        ship(3, Status(201), false),
        Op::Crash(Torn::Packed(1)),
        ship(1, Status(412), true),
        Op::Stamp { slot: 2 },
        ship(2, Status(200), false),
        w(1, Kind::Small),
        Op::Crash(Torn::PendingAfter(1, 409)),
        w(1, Kind::Large),
        Op::Crash(Torn::PendingBefore(1, 422)),
        Op::Crash(Torn::Partial(1)),
        ship(1, Status(422), false),
        w(1, Kind::Symlink),
        ship(1, Status(201), false),
        ship(0, Status(403), false),
        Op::Crash(Torn::RetireHalf(0)),
        ship(0, Status(201), false),
    ];
    ops.push(Op::Scan);
    run(&ops);
}
