//! A TCP relay on 127.0.0.1 that counts the bytes a client sends through it and cuts the
//! connection at set points, for resumable-upload tests and the resume benchmark (SPEC §13).
//! TLS passes through untouched: the cut is what a dropped link looks like to both ends.
//! [`Relay::paced`] is a slow link instead: what the clients send goes through at a set rate,
//! shared by every connection (the link adaptation benchmark, issue 21).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Where connections are cut, in bytes sent by the client.
#[derive(Debug, Clone)]
pub enum Cuts {
    /// At these totals over all connections (each cut once, in order).
    Total(Vec<u64>),
    /// The k-th connection is cut after it carried the k-th amount; later ones run free.
    PerConnection(Vec<u64>),
}

pub struct Relay {
    pub addr: SocketAddr,
    sent: Arc<AtomicU64>,
    cut: Arc<AtomicU64>,
}

/// One link of `bytes_per_s` that every connection's client-to-server bytes queue for: a chunk
/// leaves when the chunks before it have had their time on the wire.
struct Pace {
    bytes_per_s: f64,
    free_at: Mutex<tokio::time::Instant>,
}

/// Unused link time a paced relay may catch up on.
const BURST: Duration = Duration::from_millis(20);

impl Pace {
    async fn send(&self, n: usize) {
        let done = {
            let mut free_at = self.free_at.lock().unwrap_or_else(|e| e.into_inner());
            // Timers fire up to a millisecond late, longer than a TLS record takes at 1 Gbit/s:
            // the link keeps up to BURST of unused time as credit, or the late wake-ups would
            // be lost and the link would run at half its rate.
            let now = tokio::time::Instant::now();
            let start = (*free_at).max(now.checked_sub(BURST).unwrap_or(now));
            *free_at = start + Duration::from_secs_f64(n as f64 / self.bytes_per_s);
            *free_at
        };
        tokio::time::sleep_until(done).await;
    }
}

struct Plan {
    cuts: Cuts,
    next: usize,
    connections: usize,
}

impl Relay {
    /// Relays 127.0.0.1:<new port> to `target`, cutting per `cuts`.
    pub async fn start(target: SocketAddr, cuts: Cuts) -> Relay {
        Relay::with(target, cuts, None).await
    }

    /// Relays 127.0.0.1:<new port> to `target` over a link of `bits_per_s` (client to server;
    /// answers run free), never cutting.
    pub async fn paced(target: SocketAddr, bits_per_s: f64) -> Relay {
        let pace = Pace {
            bytes_per_s: bits_per_s / 8.0,
            free_at: Mutex::new(tokio::time::Instant::now()),
        };
        Relay::with(target, Cuts::Total(Vec::new()), Some(Arc::new(pace))).await
    }

    async fn with(target: SocketAddr, cuts: Cuts, pace: Option<Arc<Pace>>) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let addr = listener.local_addr().expect("relay address");
        let sent = Arc::new(AtomicU64::new(0));
        let cut = Arc::new(AtomicU64::new(0));
        let plan = Arc::new(Mutex::new(Plan {
            cuts,
            next: 0,
            connections: 0,
        }));
        let (s, c) = (sent.clone(), cut.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (s, c, plan, pace) = (s.clone(), c.clone(), plan.clone(), pace.clone());
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(target).await {
                        pipe(client, server, s, c, plan, pace).await;
                    }
                });
            }
        });
        Relay { addr, sent, cut }
    }

    /// Bytes the clients sent through the relay so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Connections cut so far.
    pub fn cuts(&self) -> u64 {
        self.cut.load(Ordering::Relaxed)
    }
}

async fn pipe(
    client: TcpStream,
    server: TcpStream,
    sent: Arc<AtomicU64>,
    cut: Arc<AtomicU64>,
    plan: Arc<Mutex<Plan>>,
    pace: Option<Arc<Pace>>,
) {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    // This connection's own limit, for the per-connection plan.
    let own = {
        let mut p = plan.lock().unwrap_or_else(|e| e.into_inner());
        p.connections += 1;
        match &p.cuts {
            Cuts::PerConnection(v) => v.get(p.connections - 1).copied(),
            Cuts::Total(_) => None,
        }
    };
    let down = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut sr, &mut cw).await;
        let _ = cw.shutdown().await;
    });
    let mut buf = vec![0u8; 64 << 10];
    let mut mine: u64 = 0;
    loop {
        let n = match cr.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        // Forward only up to the cut point, then drop both sides.
        let total = sent.load(Ordering::Relaxed);
        let room = {
            let mut p = plan.lock().unwrap_or_else(|e| e.into_inner());
            let next = p.next;
            match &p.cuts {
                Cuts::Total(v) => match v.get(next) {
                    Some(&at) if total + n as u64 >= at => {
                        p.next += 1;
                        Some(at.saturating_sub(total) as usize)
                    }
                    _ => None,
                },
                Cuts::PerConnection(_) => own
                    .filter(|&at| mine + n as u64 >= at)
                    .map(|at| (at - mine) as usize),
            }
        };
        let take = room.unwrap_or(n).min(n);
        if let Some(pace) = &pace {
            pace.send(take).await;
        }
        if sw.write_all(&buf[..take]).await.is_err() {
            break;
        }
        sent.fetch_add(take as u64, Ordering::Relaxed);
        mine += take as u64;
        if room.is_some() {
            cut.fetch_add(1, Ordering::Relaxed);
            break;
        }
    }
    down.abort();
}
