//! The gateways' admin API, as the operator uses it: status, start a drain,
//! cancel a drain. Plain HTTP/1.1 to the pod IP's admin port with the bearer
//! token from the resource's Secret; every call has a timeout, so one hung
//! pod cannot stall a reconcile.

use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use switchyard_protocol::admin::StatusResponse;
use switchyard_protocol::drain::DrainRequest;

/// Where a gateway's admin API is and how to authenticate to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminEndpoint {
    /// Pod IP.
    pub ip: String,
    /// Admin port.
    pub port: u16,
    /// Bearer token.
    pub token: String,
}

impl AdminEndpoint {
    fn url(&self, path: &str) -> String {
        if self.ip.contains(':') {
            format!("http://[{}]:{}{path}", self.ip, self.port)
        } else {
            format!("http://{}:{}{path}", self.ip, self.port)
        }
    }
}

/// Why a call to a gateway failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// No answer within the timeout.
    #[error("no answer from {0} within the timeout")]
    Timeout(String),
    /// Connection refused, reset, DNS, …
    #[error("calling {url}: {source}")]
    Transport {
        /// The URL called.
        url: String,
        /// The underlying error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The gateway answered with an unexpected status.
    #[error("{url} answered {status}: {body}")]
    Status {
        /// The URL called.
        url: String,
        /// The HTTP status.
        status: StatusCode,
        /// The (truncated) body.
        body: String,
    },
    /// The body was not what the API documents.
    #[error("{url} answered with an unreadable body: {source}")]
    Body {
        /// The URL called.
        url: String,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
}

/// The calls the reconciler makes to gateways. A trait so that request-level
/// tests can record them; [`HttpGatewayAdmin`] is the real one.
pub trait GatewayAdmin: Send + Sync + 'static {
    /// `GET /admin/status`.
    fn status<'a>(
        &'a self,
        endpoint: &'a AdminEndpoint,
    ) -> BoxFuture<'a, Result<StatusResponse, AdminError>>;
    /// `POST /admin/drain`; a drain already running counts as success.
    fn start_drain<'a>(
        &'a self,
        endpoint: &'a AdminEndpoint,
        request: &'a DrainRequest,
    ) -> BoxFuture<'a, Result<(), AdminError>>;
    /// `DELETE /admin/drain`; no drain running counts as success.
    fn cancel_drain<'a>(
        &'a self,
        endpoint: &'a AdminEndpoint,
    ) -> BoxFuture<'a, Result<(), AdminError>>;
}

/// The admin API over HTTP/1.1.
#[derive(Clone)]
pub struct HttpGatewayAdmin {
    client: Client<HttpConnector, Full<Bytes>>,
    timeout: Duration,
}

impl HttpGatewayAdmin {
    /// A client whose calls each give up after `timeout`.
    pub fn new(timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(timeout));
        connector.set_nodelay(true);
        HttpGatewayAdmin {
            client: Client::builder(TokioExecutor::new()).build(connector),
            timeout,
        }
    }

    async fn call(
        &self,
        endpoint: &AdminEndpoint,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), AdminError> {
        let url = endpoint.url(path);
        let mut builder = Request::builder()
            .method(method)
            .uri(&url)
            .header("authorization", format!("Bearer {}", endpoint.token));
        if body.is_some() {
            builder = builder.header("content-type", "application/json");
        }
        let request = builder
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|err| AdminError::Transport {
                url: url.clone(),
                source: Box::new(err),
            })?;
        let exchange = async {
            let response = self.client.request(request).await?;
            let status = response.status();
            let body = response.into_body().collect().await?.to_bytes();
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>((status, body))
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Err(_) => Err(AdminError::Timeout(url)),
            Ok(Err(source)) => Err(AdminError::Transport { url, source }),
            Ok(Ok(answer)) => Ok(answer),
        }
    }
}

fn unexpected(url: String, status: StatusCode, body: &[u8]) -> AdminError {
    let body = String::from_utf8_lossy(&body[..body.len().min(256)]).into_owned();
    AdminError::Status { url, status, body }
}

impl GatewayAdmin for HttpGatewayAdmin {
    fn status<'a>(
        &'a self,
        endpoint: &'a AdminEndpoint,
    ) -> BoxFuture<'a, Result<StatusResponse, AdminError>> {
        Box::pin(async move {
            let (status, body) = self
                .call(endpoint, Method::GET, "/admin/status", None)
                .await?;
            if status != StatusCode::OK {
                return Err(unexpected(endpoint.url("/admin/status"), status, &body));
            }
            serde_json::from_slice(&body).map_err(|source| AdminError::Body {
                url: endpoint.url("/admin/status"),
                source,
            })
        })
    }

    fn start_drain<'a>(
        &'a self,
        endpoint: &'a AdminEndpoint,
        request: &'a DrainRequest,
    ) -> BoxFuture<'a, Result<(), AdminError>> {
        Box::pin(async move {
            let body = serde_json::to_vec(request).expect("a drain request always serializes");
            let (status, body) = self
                .call(endpoint, Method::POST, "/admin/drain", Some(body))
                .await?;
            match status {
                StatusCode::ACCEPTED | StatusCode::CONFLICT => Ok(()),
                other => Err(unexpected(endpoint.url("/admin/drain"), other, &body)),
            }
        })
    }

    fn cancel_drain<'a>(
        &'a self,
        endpoint: &'a AdminEndpoint,
    ) -> BoxFuture<'a, Result<(), AdminError>> {
        Box::pin(async move {
            let (status, body) = self
                .call(endpoint, Method::DELETE, "/admin/drain", None)
                .await?;
            match status {
                StatusCode::OK | StatusCode::CONFLICT => Ok(()),
                other => Err(unexpected(endpoint.url("/admin/drain"), other, &body)),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_bracket_ipv6_addresses() {
        let v4 = AdminEndpoint {
            ip: "10.1.2.3".into(),
            port: 9090,
            token: String::new(),
        };
        assert_eq!(v4.url("/admin/status"), "http://10.1.2.3:9090/admin/status");
        let v6 = AdminEndpoint {
            ip: "fd00::1".into(),
            ..v4
        };
        assert_eq!(v6.url("/admin/drain"), "http://[fd00::1]:9090/admin/drain");
    }
}
