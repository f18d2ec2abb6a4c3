//! A stand-in for Forgejo's commit-list API (`GET /api/v1/repos/{o}/{r}/commits`), serving the
//! documented JSON shape with paging, and able to fail, hang, answer `[]` or garbage.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Ok,
    Fail,
    Hang,
    Empty,
    Garbage,
}

#[derive(Default)]
struct State {
    commits: Vec<String>,
    mode: Option<Mode>,
    /// Like Forgejo's MAX_RESPONSE_ITEMS: pages never hold more than this, whatever `limit` asks.
    max_page: Option<usize>,
    requests: Vec<(String, Option<String>)>,
}

#[derive(Clone)]
pub struct StandIn {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
}

impl StandIn {
    pub async fn start(commits: Vec<String>) -> StandIn {
        let state = Arc::new(Mutex::new(State {
            commits,
            mode: Some(Mode::Ok),
            max_page: None,
            requests: Vec::new(),
        }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let st = state.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let st = st.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let st = st.clone();
                        async move { Ok::<_, Infallible>(answer(&st, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        StandIn { addr, state }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set_mode(&self, m: Mode) {
        self.state.lock().unwrap().mode = Some(m);
    }

    pub fn set_max_page(&self, n: usize) {
        self.state.lock().unwrap().max_page = Some(n);
    }

    pub fn set_commits(&self, c: Vec<String>) {
        self.state.lock().unwrap().commits = c;
    }

    /// Paths and Authorization headers seen so far.
    pub fn requests(&self) -> Vec<(String, Option<String>)> {
        self.state.lock().unwrap().requests.clone()
    }
}

async fn answer(
    st: &Arc<Mutex<State>>,
    req: hyper::Request<hyper::body::Incoming>,
) -> hyper::Response<Full<Bytes>> {
    let path = req.uri().to_string();
    let auth = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let (mode, commits, max_page) = {
        let mut s = st.lock().unwrap();
        s.requests.push((path.clone(), auth));
        (s.mode.unwrap_or(Mode::Ok), s.commits.clone(), s.max_page)
    };
    let resp = |status: u16, body: String| {
        hyper::Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap()
    };
    match mode {
        Mode::Hang => {
            tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
            resp(200, "[]".into())
        }
        Mode::Fail => resp(500, r#"{"message":"internal error"}"#.into()),
        Mode::Empty => resp(200, "[]".into()),
        Mode::Garbage => resp(200, "<html>maintenance</html>".into()),
        Mode::Ok => {
            let q: HashMap<String, String> = path
                .split_once('?')
                .map(|(_, q)| q)
                .unwrap_or("")
                .split('&')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            let limit: usize = q.get("limit").and_then(|v| v.parse().ok()).unwrap_or(30);
            let limit = max_page.map_or(limit, |m| limit.min(m));
            let page: usize = q.get("page").and_then(|v| v.parse().ok()).unwrap_or(1);
            let items: Vec<serde_json::Value> = commits
                .iter()
                .skip((page - 1) * limit)
                .take(limit)
                .map(|sha| {
                    serde_json::json!({
                        "url": format!("http://forgejo/api/v1/repos/lab/code/git/commits/{sha}"),
                        "sha": sha,
                        "created": "2026-11-23T10:00:00Z",
                        "html_url": format!("http://forgejo/lab/code/commit/{sha}"),
                        "commit": {"message": "change", "author": {"name": "t", "email": "t@x", "date": "2026-11-23T10:00:00Z"}},
                        "author": null,
                        "committer": null,
                        "parents": [],
                        "files": null,
                        "stats": null
                    })
                })
                .collect();
            resp(200, serde_json::Value::Array(items).to_string())
        }
    }
}
