//! The plain-HTTP operations listener (`metrics_listen`): `/healthz`, `/metrics`, and the fleet
//! view (SPEC §11) as JSON (`/v1/fleet`) and as a page (`/`).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::fleet;
use crate::metrics;
use crate::state::AppState;

pub(crate) async fn serve(state: Arc<AppState>, listener: TcpListener, stop: CancellationToken) {
    let registry = Arc::new(metrics::registry(&state));
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(_) => { tokio::time::sleep(Duration::from_millis(100)).await; continue; }
            }
        };
        let st = state.clone();
        let reg = registry.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let st = st.clone();
                let reg = reg.clone();
                async move { Ok::<_, Infallible>(answer(&st, &reg, req.uri().path()).await) }
            });
            let mut b = hyper::server::conn::http1::Builder::new();
            b.timer(TokioTimer::new())
                .header_read_timeout(Some(Duration::from_secs(10)));
            let _ = b.serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}

async fn answer(
    state: &Arc<AppState>,
    registry: &Registry,
    path: &str,
) -> hyper::Response<Full<Bytes>> {
    let text = |status: u16, ct: &str, body: String| {
        hyper::Response::builder()
            .status(status)
            .header("content-type", ct)
            .body(Full::new(Bytes::from(body)))
            .unwrap_or_default()
    };
    match path {
        "/healthz" => {
            let mut problems = Vec::new();
            if !state.gate.ready() {
                let why = state
                    .gate
                    .view()
                    .last_error
                    .unwrap_or_else(|| "not loaded yet".into());
                problems.push(format!("version gate has no commit list: {why}"));
            }
            if let Err(e) = state.probe_store().await {
                problems.push(e);
            }
            let mut body = serde_json::json!({
                "ok": problems.is_empty(),
                "problems": problems,
                "store": state.store.describe(),
                "gate": state.gate.view(),
            });
            if !state.gate.enabled() {
                body["warning"] =
                    "version gate is disabled: any well-formed commit is admitted".into();
            }
            text(
                if problems.is_empty() { 200 } else { 503 },
                "application/json",
                body.to_string() + "\n",
            )
        }
        "/metrics" => {
            state.check_binary();
            text(
                200,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                metrics::encode(registry),
            )
        }
        "/v1/fleet" => {
            let view = state.fleet.view(&state.gate, SystemTime::now());
            match serde_json::to_string(&view) {
                Ok(body) => text(200, "application/json", body + "\n"),
                Err(e) => text(
                    500,
                    "text/plain",
                    format!("failed to encode the fleet: {e}\n"),
                ),
            }
        }
        "/" => {
            let view = state.fleet.view(&state.gate, SystemTime::now());
            text(200, "text/html; charset=utf-8", fleet::page::html(&view))
        }
        _ => text(404, "text/plain", "not found\n".into()),
    }
}
