//! A tiny HTTPS server whose one response the test changes while it runs,
//! standing in for an identity provider's JWKS endpoint: it counts the
//! requests it answers and can go down and come back on the same port. It
//! runs on a runtime of its own, so a test may block (e.g. polling
//! readiness) while the gateway fetches from it.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// What every request gets: status, extra headers, body.
#[derive(Debug, Clone)]
pub struct CannedResponse {
    /// HTTP status.
    pub status: u16,
    /// Headers besides `content-length` and `connection: close`.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

/// The HTTPS server (see the module docs).
pub struct CannedHttps {
    /// Where it listens (127.0.0.1).
    pub addr: SocketAddr,
    response: Arc<Mutex<CannedResponse>>,
    requests: Arc<AtomicUsize>,
    acceptor: TlsAcceptor,
    accept: Option<tokio::task::JoinHandle<()>>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl CannedHttps {
    /// Serves `response` with the certificate and key in PEM files (e.g.
    /// [`crate::TestCertificates`]).
    pub fn start(cert: &Path, key: &Path, response: CannedResponse) -> Result<CannedHttps> {
        let certs = CertificateDer::pem_file_iter(cert)
            .context("certificate")?
            .collect::<Result<Vec<_>, _>>()
            .context("certificate")?;
        let key = PrivateKeyDer::from_pem_file(key).context("key")?;
        let config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(certs, key)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let mut server = CannedHttps {
            addr: listener.local_addr()?,
            response: Arc::new(Mutex::new(response)),
            requests: Arc::default(),
            acceptor: TlsAcceptor::from(Arc::new(config)),
            accept: None,
            runtime: Some(runtime),
        };
        server.serve(listener)?;
        Ok(server)
    }

    fn serve(&mut self, listener: std::net::TcpListener) -> Result<()> {
        listener.set_nonblocking(true)?;
        let runtime = self.runtime.as_ref().context("runtime")?;
        let listener = {
            let _entered = runtime.enter();
            TcpListener::from_std(listener)?
        };
        let (acceptor, response, requests) = (
            self.acceptor.clone(),
            self.response.clone(),
            self.requests.clone(),
        );
        self.accept = Some(runtime.spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, response, requests) =
                    (acceptor.clone(), response.clone(), requests.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    // The request head; the body of a GET is empty.
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
                        match tls.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    requests.fetch_add(1, Ordering::SeqCst);
                    let canned = response.lock().expect("response").clone();
                    let mut out = format!("HTTP/1.1 {} X\r\n", canned.status);
                    for (name, value) in &canned.headers {
                        out.push_str(&format!("{name}: {value}\r\n"));
                    }
                    out.push_str(&format!(
                        "content-length: {}\r\nconnection: close\r\n\r\n",
                        canned.body.len()
                    ));
                    let mut bytes = out.into_bytes();
                    bytes.extend_from_slice(&canned.body);
                    let _ = tls.write_all(&bytes).await;
                    let _ = tls.shutdown().await;
                });
            }
        }));
        Ok(())
    }

    /// What the next requests get.
    pub fn set_response(&self, response: CannedResponse) {
        *self.response.lock().expect("response") = response;
    }

    /// Requests answered so far.
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    /// Stops listening: connections are refused until [`CannedHttps::up`].
    pub fn down(&mut self) {
        if let Some(accept) = self.accept.take() {
            accept.abort();
        }
    }

    /// Listens again on the same port.
    pub fn up(&mut self) -> Result<()> {
        let listener = std::net::TcpListener::bind(self.addr)?;
        self.serve(listener)
    }
}

impl Drop for CannedHttps {
    fn drop(&mut self) {
        self.down();
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Unpadded base64url (RFC 4648 §5), as JWKs spell key material.
pub fn base64url(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}
