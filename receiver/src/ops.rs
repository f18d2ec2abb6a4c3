//! The plain-HTTP operations listener (`metrics_listen`): `/healthz` and `/metrics`.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::state::AppState;

pub(crate) async fn serve(state: Arc<AppState>, listener: TcpListener, stop: CancellationToken) {
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(_) => { tokio::time::sleep(Duration::from_millis(100)).await; continue; }
            }
        };
        let st = state.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let st = st.clone();
                async move { Ok::<_, Infallible>(answer(&st, req.uri().path()).await) }
            });
            let mut b = hyper::server::conn::http1::Builder::new();
            b.timer(TokioTimer::new())
                .header_read_timeout(Some(Duration::from_secs(10)));
            let _ = b.serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}

async fn answer(state: &Arc<AppState>, path: &str) -> hyper::Response<Full<Bytes>> {
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
            let mut out = String::new();
            state.metrics.render(&mut out);
            state.gate.render_metrics(&mut out);
            state.store.render_metrics(&mut out);
            out.push_str(&format!(
                "# HELP cis490_receiver_store_probes_total Store writability probes run for /healthz (at most one a second).\n# TYPE cis490_receiver_store_probes_total counter\ncis490_receiver_store_probes_total {}\n",
                state.probes_run.load(Ordering::Relaxed)
            ));
            let handshaking = state
                .cfg
                .limits
                .max_handshakes
                .saturating_sub(state.handshakes.available_permits());
            out.push_str(&format!(
                "# HELP cis490_receiver_handshakes_in_progress TLS handshakes running (at most limits.max_handshakes).\n# TYPE cis490_receiver_handshakes_in_progress gauge\ncis490_receiver_handshakes_in_progress {handshaking}\n"
            ));
            text(200, "text/plain; version=0.0.4", out)
        }
        _ => text(404, "text/plain", "not found\n".into()),
    }
}
