//! Forgejo (or Gitea) REST source: `GET /api/v1/repos/{owner}/{repo}/commits?sha=<branch>`,
//! 50 commits a page, paged until `window` commits, over one kept-alive connection.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use serde::Deserialize;

use cis490_common::Commit;

use crate::config::ForgejoConfig;

pub const PAGE: usize = 50;
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest budget for a whole listing (every page); see [`ForgejoSource::list`].
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// A page larger than this is not a commit list.
const MAX_PAGE_BYTES: usize = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ForgejoError {
    #[error("forgejo base_url {0:?} is not an http(s) URL")]
    Url(String),
    #[error("failed to connect to forgejo at {0}: {1}")]
    Connect(String, String),
    #[error("forgejo request {0} failed: {1}")]
    Http(String, String),
    #[error("forgejo answered {status} for {url}")]
    Status { url: String, status: u16 },
    #[error("forgejo returned something that is not a commit list for {url}: {detail}")]
    Decode { url: String, detail: String },
    #[error("forgejo did not answer within {0:?}")]
    Timeout(Duration),
}

#[derive(Deserialize)]
struct ApiCommit {
    sha: String,
}

/// Parses one page of Forgejo's commit list (only `sha` is read).
pub fn decode_page(body: &[u8]) -> Result<Vec<Commit>, String> {
    let items: Vec<ApiCommit> = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    items
        .iter()
        .map(|c| Commit::parse(&c.sha).map_err(|e| format!("sha {:?}: {e}", c.sha)))
        .collect()
}

#[derive(Debug, Clone)]
struct Base {
    tls: bool,
    host: String,
    port: u16,
    prefix: String,
}

fn parse_base(url: &str) -> Result<Base, ForgejoError> {
    let bad = || ForgejoError::Url(url.to_string());
    let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("http://") {
        (false, r)
    } else {
        return Err(bad());
    };
    let (authority, prefix) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].trim_end_matches('/').to_string()),
        None => (rest, String::new()),
    };
    let default = if tls { 443 } else { 80 };
    let (host, port) = if let Some(h) = authority.strip_prefix('[') {
        let (h, p) = h.split_once(']').ok_or_else(bad)?;
        let port = match p.strip_prefix(':') {
            Some(p) => p.parse().map_err(|_| bad())?,
            None => default,
        };
        (h.to_string(), port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p.parse().map_err(|_| bad())?),
            None => (authority.to_string(), default),
        }
    };
    if host.is_empty() {
        return Err(bad());
    }
    Ok(Base {
        tls,
        host,
        port,
        prefix,
    })
}

pub struct ForgejoSource {
    base: Base,
    base_url: String,
    owner: String,
    repo: String,
    token: Option<String>,
    tls: Arc<rustls::ClientConfig>,
}

impl ForgejoSource {
    /// Reads the token file and the CA roots; errors name what failed.
    pub fn new(cfg: &ForgejoConfig) -> Result<ForgejoSource, (String, String)> {
        let base = parse_base(&cfg.base_url)
            .map_err(|e| ("version_gate.forgejo.base_url".to_string(), e.to_string()))?;
        let token = match &cfg.token_file {
            None => None,
            Some(p) => Some(
                std::fs::read_to_string(p)
                    .map_err(|e| {
                        (
                            "version_gate.forgejo.token_file".to_string(),
                            format!("cannot read {}: {e}", p.display()),
                        )
                    })?
                    .trim()
                    .to_string(),
            ),
        };
        let tls = client_tls(cfg.ca_file.as_deref())
            .map_err(|e| ("version_gate.forgejo.ca_file".to_string(), e))?;
        Ok(ForgejoSource {
            base,
            base_url: cfg.base_url.clone(),
            owner: cfg.owner.clone(),
            repo: cfg.repo.clone(),
            token,
            tls: Arc::new(tls),
        })
    }

    pub fn describe(&self) -> String {
        format!("forgejo {}/{}/{}", self.base_url, self.owner, self.repo)
    }

    /// The last `window` commits of `branch`, newest first, within `budget` (the gate passes
    /// twice its refresh interval, between 2 and 10 s): a hung server cannot stall the fallback.
    pub async fn list(
        &self,
        branch: &str,
        window: usize,
        budget: Duration,
    ) -> Result<Vec<Commit>, ForgejoError> {
        tokio::time::timeout(budget, self.list_inner(branch, window))
            .await
            .map_err(|_| ForgejoError::Timeout(budget))?
    }

    async fn list_inner(&self, branch: &str, window: usize) -> Result<Vec<Commit>, ForgejoError> {
        let mut send = self.connect().await?;
        let mut out: Vec<Commit> = Vec::with_capacity(window);
        let mut page = 1;
        while out.len() < window {
            let path = format!(
                "{}/api/v1/repos/{}/{}/commits?sha={}&limit={PAGE}&page={page}&stat=false&verification=false&files=false",
                self.base.prefix,
                enc(&self.owner),
                enc(&self.repo),
                enc(branch)
            );
            let url = format!(
                "{}{}",
                self.base_url.trim_end_matches('/'),
                &path[self.base.prefix.len()..]
            );
            if send.ready().await.is_err() {
                send = self.connect().await?;
            }
            let mut req = http::Request::builder()
                .method("GET")
                .uri(&path)
                .header("host", self.host_header())
                .header("accept", "application/json")
                .header(
                    "user-agent",
                    concat!("cis490-receiver/", env!("CARGO_PKG_VERSION")),
                );
            if let Some(t) = &self.token {
                req = req.header("authorization", format!("token {t}"));
            }
            let req = req
                .body(Empty::<Bytes>::new())
                .map_err(|e| ForgejoError::Http(url.clone(), e.to_string()))?;
            let resp = send
                .send_request(req)
                .await
                .map_err(|e| ForgejoError::Http(url.clone(), e.to_string()))?;
            let status = resp.status().as_u16();
            if status != 200 {
                return Err(ForgejoError::Status { url, status });
            }
            let body = http_body_util::Limited::new(resp.into_body(), MAX_PAGE_BYTES)
                .collect()
                .await
                .map_err(|e| ForgejoError::Http(url.clone(), e.to_string()))?
                .to_bytes();
            let commits = decode_page(&body).map_err(|detail| ForgejoError::Decode {
                url: url.clone(),
                detail,
            })?;
            // Only an empty page ends the list: a server whose page size is capped below PAGE
            // (Forgejo's MAX_RESPONSE_ITEMS) still pages on.
            if commits.is_empty() {
                break;
            }
            out.extend(commits);
            page += 1;
        }
        out.truncate(window);
        Ok(out)
    }

    fn host_header(&self) -> String {
        let default = if self.base.tls { 443 } else { 80 };
        let h = if self.base.host.contains(':') {
            format!("[{}]", self.base.host)
        } else {
            self.base.host.clone()
        };
        if self.base.port == default {
            h
        } else {
            format!("{h}:{}", self.base.port)
        }
    }

    async fn connect(
        &self,
    ) -> Result<hyper::client::conn::http1::SendRequest<Empty<Bytes>>, ForgejoError> {
        let where_ = format!("{}:{}", self.base.host, self.base.port);
        let tcp = tokio::time::timeout(
            CONNECT_TIMEOUT,
            tokio::net::TcpStream::connect((self.base.host.as_str(), self.base.port)),
        )
        .await
        .map_err(|_| ForgejoError::Connect(where_.clone(), "timed out".into()))?
        .map_err(|e| ForgejoError::Connect(where_.clone(), e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        macro_rules! handshake {
            ($io:expr) => {{
                let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new($io))
                    .await
                    .map_err(|e| ForgejoError::Connect(where_.clone(), e.to_string()))?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                send
            }};
        }
        if self.base.tls {
            let name = ServerName::try_from(self.base.host.clone())
                .map_err(|e| ForgejoError::Connect(where_.clone(), e.to_string()))?;
            let tls = tokio::time::timeout(
                CONNECT_TIMEOUT,
                tokio_rustls::TlsConnector::from(self.tls.clone()).connect(name, tcp),
            )
            .await
            .map_err(|_| ForgejoError::Connect(where_.clone(), "TLS handshake timed out".into()))?
            .map_err(|e| ForgejoError::Connect(where_.clone(), format!("TLS: {e}")))?;
            Ok(handshake!(tls))
        } else {
            Ok(handshake!(tcp))
        }
    }
}

/// Percent-encodes a path or query component.
fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// System roots plus an optional extra CA bundle.
fn client_tls(extra_ca: Option<&Path>) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for c in native.certs {
        let _ = roots.add(c);
    }
    if let Some(p) = extra_ca {
        let extra = cis490_common::tls::load_certs(p).map_err(|e| e.to_string())?;
        for c in extra {
            roots.add(c).map_err(|e| format!("{}: {e}", p.display()))?;
        }
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(cis490_common::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_decode_and_garbage_does_not() {
        let c = "0123456789abcdef0123456789abcdef01234567";
        let page = format!(r#"[{{"sha":"{c}","commit":{{"message":"x"}},"parents":[]}}]"#);
        assert_eq!(decode_page(page.as_bytes()).unwrap()[0].to_string(), c);
        assert!(decode_page(b"[]").unwrap().is_empty());
        assert!(decode_page(b"<html>").is_err());
        assert!(decode_page(br#"{"message":"not found"}"#).is_err());
        assert!(decode_page(br#"[{"sha":"xyz"}]"#).is_err());
    }

    #[test]
    fn base_urls() {
        let b = parse_base("https://git.lab").unwrap();
        assert_eq!(
            (b.tls, b.host.as_str(), b.port, b.prefix.as_str()),
            (true, "git.lab", 443, "")
        );
        let b = parse_base("http://127.0.0.1:3000/forgejo/").unwrap();
        assert_eq!(
            (b.tls, b.port, b.prefix.as_str()),
            (false, 3000, "/forgejo")
        );
        assert!(parse_base("ftp://x").is_err());
        assert!(parse_base("https://").is_err());
        assert_eq!(enc("feature/x y"), "feature%2Fx%20y");
    }
}
