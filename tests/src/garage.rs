//! A real 3-node Garage cluster for the S3 store's tests (through `scripts/garage-cluster.sh`),
//! an S3 client to look into the bucket, and a TCP proxy that can make the bucket unreachable.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as Key;
use object_store::{Attribute, ClientOptions, GetOptions, ObjectStore, PutPayload};
use tokio_util::sync::CancellationToken;

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

fn script() -> PathBuf {
    repo_root().join("scripts/garage-cluster.sh")
}

pub struct Garage {
    pub dir: PathBuf,
    pub endpoint: String,
    pub key_id: String,
    pub secret: String,
    pub bucket: String,
}

/// A base port whose node ports (+0..+3, +10.., +20..) are all free right now.
fn free_base() -> u16 {
    let mut x = std::process::id() as u64
        ^ (std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1));
    for _ in 0..200 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let base = 20_000 + ((x >> 33) % 3_500) as u16 * 10;
        let all_free = (0..3).all(|n| {
            [0u16, 1, 3]
                .iter()
                .all(|off| std::net::TcpListener::bind(("127.0.0.1", base + n * 10 + off)).is_ok())
        });
        if all_free {
            return base;
        }
    }
    panic!("no free port range for a Garage cluster");
}

impl Garage {
    /// Starts a fresh cluster under `dir` (about 2 s). Panics with the install command when
    /// Garage is missing: the CI script installs it.
    pub fn start(dir: &Path) -> Garage {
        let base = free_base();
        let out = Command::new("bash")
            .arg(script())
            .arg("start")
            .arg(dir)
            .arg(base.to_string())
            .output()
            .expect("bash runs");
        assert!(
            out.status.success(),
            "garage cluster failed to start (is Garage installed? `cargo install garage --locked --version 2.5.0`, or scripts/install-test-deps.sh):\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let env: HashMap<String, String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Garage {
            dir: dir.to_path_buf(),
            endpoint: env["GARAGE_ENDPOINT"].clone(),
            key_id: env["GARAGE_KEY_ID"].clone(),
            secret: env["GARAGE_SECRET"].clone(),
            bucket: env["GARAGE_BUCKET"].clone(),
        }
    }

    /// The S3 endpoint of node 1 (what receivers talk to unless told otherwise).
    pub fn addr(&self) -> SocketAddr {
        self.endpoint
            .trim_start_matches("http://")
            .parse()
            .expect("endpoint is host:port")
    }

    /// A receiver `[store]` section for this cluster, through `endpoint`.
    pub fn store_section(&self, endpoint: &str, prefix: &str) -> String {
        format!(
            "[store]\nkind = \"s3\"\nendpoint = \"{endpoint}\"\nregion = \"garage\"\nbucket = \"{}\"\nprefix = \"{prefix}\"\naccess_key_file = \"{}\"\nsecret_key_file = \"{}\"\n",
            self.bucket,
            self.dir.join("access_key").display(),
            self.dir.join("secret_key").display(),
        )
    }

    fn run(&self, args: &[&str]) {
        let out = Command::new("bash")
            .arg(script())
            .args(args)
            .output()
            .expect("bash runs");
        assert!(
            out.status.success(),
            "garage-cluster.sh {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn kill_node(&self, n: u8) {
        self.run(&["kill-node", &self.dir.to_string_lossy(), &n.to_string()]);
    }

    pub fn start_node(&self, n: u8) {
        self.run(&["start-node", &self.dir.to_string_lossy(), &n.to_string()]);
    }

    /// An S3 client on the bucket, for looking at what the receivers wrote.
    pub fn bucket(&self) -> Bucket {
        let os = AmazonS3Builder::new()
            .with_endpoint(&self.endpoint)
            .with_region("garage")
            .with_bucket_name(&self.bucket)
            .with_access_key_id(&self.key_id)
            .with_secret_access_key(&self.secret)
            .with_virtual_hosted_style_request(false)
            .with_client_options(ClientOptions::new().with_allow_http(true))
            .build()
            .expect("S3 client");
        Bucket { os: Arc::new(os) }
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(script())
            .arg("stop")
            .arg(&self.dir)
            .output();
    }
}

#[derive(Clone)]
pub struct Bucket {
    pub os: Arc<AmazonS3>,
}

impl Bucket {
    /// Every key under `prefix` (a key prefix ending at a `/` boundary), sorted.
    pub async fn keys(&self, prefix: &str) -> Vec<String> {
        let p = Key::from(prefix.trim_end_matches('/'));
        let mut s = self.os.list(Some(&p));
        let mut out = Vec::new();
        while let Some(m) = s.next().await {
            out.push(m.expect("list").location.to_string());
        }
        out.sort();
        out
    }

    pub async fn get(&self, key: &str) -> Option<Bytes> {
        match self.os.get(&Key::from(key)).await {
            Ok(r) => Some(r.bytes().await.expect("body")),
            Err(object_store::Error::NotFound { .. }) => None,
            Err(e) => panic!("get {key}: {e}"),
        }
    }

    pub async fn json(&self, key: &str) -> Option<serde_json::Value> {
        self.get(key)
            .await
            .map(|b| serde_json::from_slice(&b).expect("JSON object"))
    }

    pub async fn put(&self, key: &str, data: Vec<u8>) {
        self.os
            .put(&Key::from(key), PutPayload::from(data))
            .await
            .expect("put");
    }

    pub async fn delete(&self, key: &str) {
        self.os.delete(&Key::from(key)).await.expect("delete");
    }

    /// The user metadata (`x-amz-meta-*`) of an object.
    pub async fn metadata(&self, key: &str) -> HashMap<String, String> {
        let r = self
            .os
            .get_opts(
                &Key::from(key),
                GetOptions {
                    head: true,
                    ..Default::default()
                },
            )
            .await
            .expect("head");
        r.attributes
            .iter()
            .filter_map(|(k, v)| match k {
                Attribute::Metadata(name) => Some((name.to_string(), v.as_ref().to_string())),
                _ => None,
            })
            .collect()
    }
}

/// A TCP forwarder in front of the bucket: `cut()` drops every connection and refuses new
/// ones (the bucket is unreachable), `restore()` lets traffic through again.
pub struct Proxy {
    pub addr: SocketAddr,
    open: Arc<AtomicBool>,
    generation: Arc<std::sync::Mutex<CancellationToken>>,
    stop: CancellationToken,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let open = Arc::new(AtomicBool::new(true));
        let generation = Arc::new(std::sync::Mutex::new(CancellationToken::new()));
        let stop = CancellationToken::new();
        let (o, g, s) = (open.clone(), generation.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let (mut inbound, _) = tokio::select! {
                    _ = s.cancelled() => return,
                    r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
                };
                if !o.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let cut = g.lock().unwrap().clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = cut.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    }
                });
            }
        });
        Proxy {
            addr,
            open,
            generation,
            stop,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        let mut g = self.generation.lock().unwrap();
        g.cancel();
        *g = CancellationToken::new();
    }

    pub fn restore(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
