//! The operator's HTTP listener shared by the relay and the hub connector: Prometheus
//! `/metrics` and `/healthz` over HTTP/1.1 (`hyper`), GET/HEAD only, on a TCP listener of its
//! own (never the QUIC port). What the numbers are and when the service is healthy is the
//! caller's, through [`OpsSource`]; this module owns only the serving.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// Content type of the Prometheus text exposition format.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What the listener serves.
pub trait OpsSource: Send + Sync + 'static {
    /// The Prometheus text exposition of the current numbers.
    fn metrics(&self) -> String;
    /// `Ok` while healthy; `Err(why)` is answered with 503 and `why`.
    fn health(&self) -> Result<(), &'static str>;
}

/// Serves `listener` until the returned task is aborted. Returns the bound address (with the
/// real port if `:0` was asked for) and the serving task.
pub fn serve<S: OpsSource>(
    listener: TcpListener,
    source: Arc<S>,
) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    let local = listener.local_addr()?;
    let task = tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Typically EMFILE; back off a little instead of spinning.
                    tracing::debug!("metrics listener: accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let source = Arc::clone(&source);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let source = Arc::clone(&source);
                    async move { Ok::<_, Infallible>(respond(source.as_ref(), &req)) }
                });
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    tracing::debug!("metrics connection ended: {e}");
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

fn respond<S: OpsSource>(source: &S, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET or HEAD only\n".into());
    }
    match req.uri().path() {
        "/metrics" => text(StatusCode::OK, PROMETHEUS_TEXT, source.metrics()),
        "/healthz" => match source.health() {
            Ok(()) => text(StatusCode::OK, "text/plain", "ok\n".into()),
            Err(why) => text(StatusCode::SERVICE_UNAVAILABLE, "text/plain", format!("{why}\n")),
        },
        _ => text(StatusCode::NOT_FOUND, "text/plain", "try /metrics or /healthz\n".into()),
    }
}
