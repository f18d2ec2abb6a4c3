//! A real hyper + rustls client presenting a client certificate.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use cis490_common::tls;

use crate::pki::CertFiles;

#[derive(Clone)]
pub struct Client {
    pub addr: SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
    pub h2: bool,
    pub token: Option<String>,
}

#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "reply is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn error(&self) -> String {
        self.json()["error"].as_str().unwrap_or("").to_string()
    }
}

impl Client {
    pub fn new(addr: SocketAddr, ca: &std::path::Path, me: &CertFiles) -> Client {
        let cfg = tls::client_config(
            &tls::ClientTlsFiles {
                ca_file: ca,
                cert_file: &me.cert,
                key_file: &me.key,
            },
            false,
        )
        .unwrap();
        Client {
            addr,
            cfg: Arc::new(cfg),
            h2: false,
            token: None,
        }
    }

    pub fn http2(mut self) -> Client {
        let mut cfg = (*self.cfg).clone();
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        self.cfg = Arc::new(cfg);
        self.h2 = true;
        self
    }

    pub fn with_token(mut self, token: &str) -> Client {
        self.token = Some(token.to_string());
        self
    }

    /// A TCP connection and TLS handshake to the receiver as this client.
    async fn connect(&self) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
        let tcp = TcpStream::connect(self.addr)
            .await
            .map_err(|e| e.to_string())?;
        let name = ServerName::try_from("localhost").map_err(|e| e.to_string())?;
        TlsConnector::from(self.cfg.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())
    }

    /// TLS handshake only; the error text shows why a server refused it.
    pub async fn handshake(&self) -> Result<(), String> {
        let mut s = self.connect().await?;
        // In TLS 1.3 the server judges the client certificate after the client finished:
        // a refusal arrives as an alert on the first read.
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        s.write_all(b"GET /v1/nothing HTTP/1.1\r\nhost: localhost\r\n\r\n")
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = [0u8; 64];
        match s.read(&mut buf).await {
            Ok(0) => Err("connection closed".into()),
            Ok(_) => Ok(()),
            Err(e) => Err(e.to_string()),
        }
    }

    pub async fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, String)],
        body: Vec<u8>,
    ) -> Result<Reply, String> {
        let tcp = TcpStream::connect(self.addr)
            .await
            .map_err(|e| e.to_string())?;
        let name = ServerName::try_from("localhost").map_err(|e| e.to_string())?;
        let tls = TlsConnector::from(self.cfg.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| format!("tls: {e}"))?;
        let mut req = http::Request::builder()
            .method(method)
            .uri(format!("https://localhost:{}{path}", self.addr.port()));
        if !self.h2 {
            req = req.header("host", format!("localhost:{}", self.addr.port()));
        }
        if let Some(t) = &self.token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        let req = req
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        let io = TokioIo::new(tls);
        let resp = if self.h2 {
            let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            send.send_request(req).await.map_err(|e| e.to_string())?
        } else {
            let (mut send, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            send.send_request(req).await.map_err(|e| e.to_string())?
        };
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes()
            .to_vec();
        Ok(Reply {
            status,
            headers,
            body,
        })
    }

    /// One HTTP/1.1 request sent with `Expect: 100-continue`: the body goes only after the
    /// receiver's `100 Continue`, so an answer given from the headers alone (a refusal, 200
    /// already stored) comes back as a reply instead of a broken body write.
    pub async fn request_expect(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, String)],
        body: &[u8],
    ) -> Result<Reply, String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = self.connect().await.map_err(|e| format!("tls: {e}"))?;
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nhost: localhost\r\ncontent-length: {}\r\nexpect: 100-continue\r\n",
            body.len()
        );
        if let Some(t) = &self.token {
            head.push_str(&format!("authorization: Bearer {t}\r\n"));
        }
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        s.write_all(head.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut answer = crate::harness::read_head(&mut s).await;
        if answer.starts_with("HTTP/1.1 100") {
            s.write_all(body).await.map_err(|e| e.to_string())?;
            s.flush().await.map_err(|e| e.to_string())?;
            answer = crate::harness::read_head(&mut s).await;
        }
        let mut lines = answer.split("\r\n");
        let status: u16 = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| format!("no status line in {answer:?}"))?;
        let mut map = http::HeaderMap::new();
        for l in lines.filter(|l| !l.is_empty()) {
            if let Some((k, v)) = l.split_once(':') {
                if let (Ok(k), Ok(v)) = (
                    http::HeaderName::from_bytes(k.trim().as_bytes()),
                    http::HeaderValue::from_str(v.trim()),
                ) {
                    map.append(k, v);
                }
            }
        }
        let len: usize = map
            .get("content-length")
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .unwrap_or(0);
        let mut out = vec![0u8; len];
        s.read_exact(&mut out).await.map_err(|e| e.to_string())?;
        Ok(Reply {
            status,
            headers: map,
            body: out,
        })
    }

    /// PUTs a packed episode with the headers a shipper sends.
    pub async fn put(&self, host: &str, b: &crate::episode::Body) -> Reply {
        self.put_result(host, b).await.expect("request completes")
    }

    /// Like [`Client::put`], but a connection or TLS failure is returned, not a panic.
    pub async fn put_result(&self, host: &str, b: &crate::episode::Body) -> Result<Reply, String> {
        self.request(
            "PUT",
            &format!("/v1/episodes/{host}/{}", b.id),
            &[
                ("x-cis490-code-commit", b.commit.clone()),
                ("x-cis490-tar-sha256", b.sha.clone()),
                ("content-type", "application/zstd".into()),
            ],
            b.bytes.clone(),
        )
        .await
    }
}

/// An HTTP/2 connection to the receiver presenting `me`: its request handle and the task
/// driving it (which ends when the server closes the connection).
pub async fn h2_connect(
    addr: SocketAddr,
    ca: &std::path::Path,
    me: &CertFiles,
) -> (
    hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    tokio::task::JoinHandle<Result<(), hyper::Error>>,
) {
    // The config of an HTTP/2 [`Client`]: ALPN h2 and `me` as the client certificate.
    let cfg = Client::new(addr, ca, me).http2().cfg;
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = TlsConnector::from(cfg)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    (send, tokio::spawn(conn))
}

/// A bare TLS stream to the receiver presenting `me`, for requests written by hand (slow
/// clients, partial bodies, disconnects).
pub async fn raw_tls(
    addr: SocketAddr,
    ca: &std::path::Path,
    me: &CertFiles,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let cfg = tls::client_config(
        &tls::ClientTlsFiles {
            ca_file: ca,
            cert_file: &me.cert,
            key_file: &me.key,
        },
        false,
    )
    .unwrap();
    let tcp = TcpStream::connect(addr).await.unwrap();
    TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap()
}
