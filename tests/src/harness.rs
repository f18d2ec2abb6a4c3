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
        let server = pki.server("server");
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
