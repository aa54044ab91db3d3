//! The operator's HTTP listener: Prometheus `/metrics` and `/healthz`, on its own TCP port
//! (by default loopback only), separate from the relay's UDP port so that it is never exposed
//! to hubs and apps by accident.
//!
//! `/healthz` answers 200 only while the QUIC listener accepts; it answers 503 from the moment a
//! graceful shutdown starts, so a load balancer or Kubernetes stops sending new traffic while
//! the relay drains. HTTP/1.1 only (`hyper`), GET/HEAD only; anything else is 404/405.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::debug;

use crate::stats::RelayStats;

/// Content type of the Prometheus text exposition format.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What the listener reads: the metrics and whether the relay is draining.
#[derive(Clone)]
pub(crate) struct MetricsState {
    pub stats: Arc<RelayStats>,
    pub draining: watch::Receiver<bool>,
}

/// Binds `addr` and serves until the task is aborted. Returns the bound address (with the real
/// port if `:0` was asked for) and the serving task.
pub(crate) async fn serve(
    addr: SocketAddr,
    state: MetricsState,
) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let task = tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Typically EMFILE; back off a little instead of spinning.
                    debug!("metrics listener: accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let state = state.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let state = state.clone();
                    async move { Ok::<_, Infallible>(respond(&state, &req)) }
                });
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    debug!("metrics connection ended: {e}");
                }
            });
        }
    });
    Ok((local, task))
}

fn text(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = hyper::header::HeaderValue::from_str(content_type) {
        response.headers_mut().insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}

fn respond(state: &MetricsState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET or HEAD only\n".into());
    }
    match req.uri().path() {
        "/metrics" => text(StatusCode::OK, PROMETHEUS_TEXT, state.stats.encode()),
        "/healthz" => {
            if *state.draining.borrow() {
                text(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "draining\n".into())
            } else {
                text(StatusCode::OK, "text/plain", "ok\n".into())
            }
        }
        _ => text(StatusCode::NOT_FOUND, "text/plain", "try /metrics or /healthz\n".into()),
    }
}
