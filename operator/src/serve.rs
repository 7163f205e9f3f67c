//! The operator's own HTTP endpoint: `/metrics` (Prometheus) and `/healthz`.

use std::convert::Infallible;
use std::future::Future;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::debug;

use crate::metrics::Metrics;

/// Answers one request.
pub fn respond(path: &str, metrics: &Metrics) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match path {
        "/metrics" => (
            StatusCode::OK,
            "text/plain; version=0.0.4",
            metrics.render(),
        ),
        "/healthz" => (StatusCode::OK, "text/plain", "ok".to_string()),
        _ => (StatusCode::NOT_FOUND, "text/plain", "not found".to_string()),
    };
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}

/// Serves until `shutdown` completes.
pub async fn serve(listener: TcpListener, metrics: Metrics, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(err) => {
                    debug!(error = %err, "accept failed");
                    continue;
                }
            },
            _ = &mut shutdown => return,
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let response = respond(request.uri().path(), &metrics);
                async move { Ok::<_, Infallible>(response) }
            });
            if let Err(err) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(error = %err, "metrics connection ended");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let metrics = Metrics::new().expect("metrics");
        metrics.set_leader(true);
        assert_eq!(respond("/healthz", &metrics).status(), StatusCode::OK);
        assert_eq!(respond("/metrics", &metrics).status(), StatusCode::OK);
        assert_eq!(respond("/nope", &metrics).status(), StatusCode::NOT_FOUND);
    }

    #[test]
    fn build_info_and_process_metrics_are_exported() {
        let text = Metrics::new().expect("metrics").render();
        assert!(
            text.lines().any(
                |l| l.starts_with(r#"switchyard_build_info{component="operator","#)
                    && l.ends_with(&format!(r#"version="{}"}} 1"#, env!("CARGO_PKG_VERSION")))
            ),
            "{text}"
        );
        for family in ["process_open_fds ", "process_resident_memory_bytes "] {
            assert!(
                text.lines().any(|l| l.starts_with(family)),
                "{family} in {text}"
            );
        }
    }
}
