//! Receivers for tests: in-process on 127.0.0.1:0, or the real binary as a child process.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::git::GitRepo;
use crate::pki::{CertFiles, Pki};

/// A test's world: a temp dir, a PKI, a git repository with history, and a receiver config.
pub struct World {
    pub tmp: tempfile::TempDir,
    pub pki: Pki,
    pub server: CertFiles,
    pub repo: GitRepo,
    pub commits: Vec<String>,
}

impl World {
    /// `n` commits on main; the receiver's window is the last 100 by default.
    pub fn new(n: usize) -> World {
        let tmp = tempfile::tempdir().unwrap();
        let pki = Pki::new(&tmp.path().join("pki"), "lab");
        let server = pki.receiver();
        let mut repo = GitRepo::init(&tmp.path().join("repo"));
        let mut commits = Vec::new();
        for _ in 0..n {
            commits.push(repo.commit());
        }
        World {
            tmp,
            pki,
            server,
            repo,
            commits,
        }
    }

    pub fn path(&self) -> &Path {
        self.tmp.path()
    }

    pub fn store_dir(&self) -> PathBuf {
        self.tmp.path().join("store")
    }

    /// A receiver config on ephemeral loopback ports; `extra` is appended verbatim.
    pub fn config(&self, extra: &str) -> PathBuf {
        let text = format!(
            r#"listen = "127.0.0.1:0"
metrics_listen = "127.0.0.1:0"
store_dir = "{store}"

[tls]
cert_file = "{cert}"
key_file = "{key}"
client_ca_file = "{ca}"

{extra}
"#,
            store = self.store_dir().display(),
            cert = self.server.cert.display(),
            key = self.server.key.display(),
            ca = self.pki.ca_file.display(),
        );
        let text = if text.contains("[version_gate]") {
            text
        } else {
            format!(
                "{text}\n[version_gate]\nrepo_path = \"{}\"\nrefresh_interval_s = 1\n",
                self.repo.path.display()
            )
        };
        let p = self.tmp.path().join("receiver.toml");
        std::fs::write(&p, text).unwrap();
        p
    }

    pub fn client(&self, addr: SocketAddr, host: &str) -> crate::client::Client {
        crate::client::Client::new(addr, &self.pki.ca_file, &self.pki.client(host))
    }
}

/// A receiver serving inside the test's runtime.
pub struct InProcess {
    pub addr: SocketAddr,
    pub ops_addr: SocketAddr,
    pub receiver: cis490_receiver::Receiver,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl InProcess {
    pub async fn start(config: &Path) -> InProcess {
        let cfg = cis490_receiver::Config::load(config).unwrap();
        let receiver = cis490_receiver::Receiver::new(cfg, config).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ops = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let ops_addr = ops.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let r = receiver.clone();
        let s = shutdown.clone();
        let task = tokio::spawn(async move { r.serve(listener, Some(ops), s).await });
        let me = InProcess {
            addr,
            ops_addr,
            receiver,
            shutdown,
            task,
        };
        me.wait_gate().await;
        me
    }

    /// Waits until the gate has loaded (or given up), so tests start from a settled state.
    async fn wait_gate(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let gate = &self.receiver.state.gate;
        while !gate.ready() && gate.view().last_error.is_none() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
    }

    pub async fn ops_get(&self, path: &str) -> (u16, String) {
        ops_get(self.ops_addr, path).await
    }
}

/// GET on the plain-HTTP operations listener.
pub async fn ops_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Reads one series' value from Prometheus text.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// The real receiver binary as a child process, with its stderr captured.
pub struct Process {
    pub child: Child,
    pub addr: SocketAddr,
    pub ops_addr: SocketAddr,
    pub log: Arc<Mutex<Vec<String>>>,
}

/// A binary of this crate, next to the test executable's `deps/` directory (cargo builds a
/// package's binaries before its integration tests).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(|d| {
            if d.ends_with("deps") {
                d.parent()
            } else {
                Some(d)
            }
        })
        .expect("target directory");
    dir.join(name)
}

/// `cis490-receiver --config <config> check-config`: its exit code and stderr.
pub fn receiver_check_config(config: &Path) -> (Option<i32>, String) {
    let out = Command::new(receiver_bin())
        .arg("--config")
        .arg(config)
        .arg("check-config")
        .output()
        .expect("receiver runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn receiver_bin() -> PathBuf {
    bin("e2e-receiver")
}

impl Process {
    /// Starts `e2e-receiver --config <config> serve` and waits for its listening line.
    pub fn start(config: &Path, envs: &[(&str, &str)]) -> Process {
        Self::start_with(&mut Command::new(receiver_bin()), config, envs)
    }

    /// Like [`Process::start`], with `cmd` as the program (a wrapper that execs the receiver).
    pub fn start_with(cmd: &mut Command, config: &Path, envs: &[(&str, &str)]) -> Process {
        cmd.arg("--config")
            .arg(config)
            .arg("serve")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env("CIS490_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("receiver starts");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let l = log.clone();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if !sent && line.contains("receiver listening") {
                    let _ = tx.send(line.clone());
                    sent = true;
                }
                l.lock().unwrap().push(line);
            }
        });
        let line = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                panic!("receiver did not start: {:?}", log.lock().unwrap());
            }
        };
        let field = |name: &str| -> SocketAddr {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{name}=")))
                .and_then(|v| v.trim_matches('"').parse().ok())
                .unwrap_or_else(|| panic!("no {name} in {line:?}"))
        };
        Process {
            addr: field("listen"),
            ops_addr: field("metrics_listen"),
            child,
            log,
        }
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig).unwrap();
    }

    /// Waits up to `limit` for exit; returns the exit code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn shipper_bin() -> PathBuf {
    bin("e2e-shipper")
}

impl World {
    /// A lab-host config for `host` shipping to `url`, data under `<tmp>/<host>`. `extra` holds
    /// `[receiver]` keys, then optionally `[shipping]` keys (merged over the test defaults) and
    /// other sections; its `[metrics]` keys are merged over `listen = "127.0.0.1:0"`, so
    /// daemons of parallel tests never contend for the default port.
    pub fn shipper_config(&self, host: &str, url: &str, extra: &str) -> PathBuf {
        self.shipper_config_with(host, &self.pki.client(host), url, extra)
    }

    pub fn shipper_config_with(
        &self,
        host: &str,
        cert: &CertFiles,
        url: &str,
        extra: &str,
    ) -> PathBuf {
        let data = self.data_dir(host);
        let (extra, metrics) = take_section(extra, "[metrics]");
        let extra = extra.as_str();
        let text = format!(
            r#"host_id = "{host}"
data_dir = "{data}"

[receiver]
url = {url}
ca_file = "{ca}"
cert_file = "{cert}"
key_file = "{key}"
connect_timeout_s = 2
idle_timeout_s = 10
{extra_receiver}
[shipping]
{shipping}

[metrics]
{metrics}
"#,
            data = data.display(),
            url = if url.starts_with('[') { url.to_string() } else { format!("\"{url}\"") },
            ca = self.pki.ca_file.display(),
            cert = cert.cert.display(),
            key = cert.key.display(),
            extra_receiver = extra.split("[shipping]").next().unwrap_or(""),
            shipping = merge_keys(
                "scan_interval_s = 1\nsettle_s = 0\nconcurrency = 2\nzstd_threads = 1\nmax_backoff_s = 2\n",
                extra.split("[shipping]").nth(1).unwrap_or(""),
            ),
            metrics = merge_keys("listen = \"127.0.0.1:0\"", &metrics),
        );
        let p = self.tmp.path().join(format!("{host}.toml"));
        std::fs::write(&p, text).unwrap();
        p
    }

    pub fn data_dir(&self, host: &str) -> PathBuf {
        self.tmp.path().join("lab").join(host)
    }
}

/// `text` without its `header` section, and that section's lines (up to the next header).
fn take_section(text: &str, header: &str) -> (String, String) {
    let mut rest = Vec::new();
    let mut section = Vec::new();
    let mut inside = false;
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('[') && !t.contains('=') {
            inside = t == header;
            if inside {
                continue;
            }
        }
        if inside {
            section.push(line);
        } else {
            rest.push(line);
        }
    }
    (rest.join("\n"), section.join("\n"))
}

/// The address a daemon's `/metrics` listener was bound to, from its `shipper started` line.
pub fn metrics_addr(log: &str) -> Option<SocketAddr> {
    log.lines()
        .rev()
        .filter(|l| l.contains("shipper started"))
        .find_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("metrics_listen="))
                .and_then(|v| v.trim_matches('"').parse().ok())
        })
}

/// `key = value` lines of `base`, overridden and extended by those of `over`.
fn merge_keys(base: &str, over: &str) -> String {
    let key = |l: &str| l.split('=').next().unwrap_or("").trim().to_string();
    let over_keys: Vec<String> = over.lines().filter(|l| l.contains('=')).map(key).collect();
    let mut out: Vec<&str> = base
        .lines()
        .filter(|l| !over_keys.contains(&key(l)))
        .collect();
    out.extend(over.lines());
    out.join("\n")
}

/// `<exe> --config <cfg> run` as a quiet daemon, its stderr appended to `<cfg>.log`, with
/// `envs` set (and no notify socket or watchdog unless `envs` says so).
pub fn shipper_daemon(exe: &Path, cfg: &Path, envs: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(exe);
    cmd.arg("--config")
        .arg(cfg)
        .arg("run")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env("CIS490_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(cfg.with_extension("log"))
                .expect("daemon log file opens"),
        ));
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd
}

/// Runs `cmd` to completion; returns (exit code, stdout, stderr).
pub fn output(cmd: &mut Command) -> (i32, String, String) {
    let out = cmd.output().expect("command runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs a shipper command to completion; returns (exit code, stdout, stderr).
pub fn shipper(config: &Path, args: &[&str]) -> (i32, String, String) {
    output(
        Command::new(shipper_bin())
            .arg("--config")
            .arg(config)
            .args(args)
            .env("CIS490_LOG", "info")
            .env_remove("NOTIFY_SOCKET"),
    )
}

/// A peer that takes the request head and then never reads another byte: an upload to it
/// stalls.
pub async fn stalled_receiver(world: &World) -> SocketAddr {
    fake_receiver(world, |mut tls| async move {
        let _ = read_head(&mut tls).await;
        tokio::time::sleep(Duration::from_secs(3600)).await;
        drop(tls);
    })
    .await
}

/// A TLS server with the receiver's certificate that does whatever `behave` says with each
/// connection: a stand-in for a stalled or scripted peer.
pub async fn fake_receiver<F, Fut>(world: &World, behave: F) -> SocketAddr
where
    F: Fn(tokio_rustls::server::TlsStream<tokio::net::TcpStream>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let cfg = cis490_common::tls::server_config(&cis490_common::tls::ServerTlsFiles {
        cert_file: &world.server.cert,
        key_file: &world.server.key,
        client_ca_file: &world.pki.ca_file,
        crl_file: None,
    })
    .unwrap();
    let mut cfg = cfg;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let behave = Arc::new(behave);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let behave = behave.clone();
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(tcp).await {
                    behave(tls).await;
                }
            });
        }
    });
    addr
}

/// Reads an HTTP/1.1 request head from `s` (up to the blank line).
pub async fn read_head<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> String {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut b).await {
            Ok(1) => head.push(b[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// A small deterministic generator, so a failing random schedule can be replayed from its seed.
pub struct Lcg(pub u64);

impl Lcg {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// The seed from `CIS490_CRASH_SEED`, else the clock (printed by the callers).
pub fn crash_seed() -> u64 {
    std::env::var("CIS490_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        })
}
