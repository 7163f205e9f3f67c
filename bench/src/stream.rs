//! The load generator's client socket: plain TCP, or TLS when `--tls-ca`
//! names the CA the server's certificate chains to (wss:// handshakes).

use std::io;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use anyhow::{Context as _, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// Set once from `--tls-ca`: every connection is then TLS.
static CONNECTOR: OnceLock<TlsConnector> = OnceLock::new();

/// Makes every later connection TLS, trusting the CA certificate(s) in `ca_pem`.
pub fn use_tls(ca_pem: &std::path::Path) -> Result<()> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_pem).context("--tls-ca")? {
        roots.add(cert.context("--tls-ca")?).context("--tls-ca")?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let _ = CONNECTOR.set(TlsConnector::from(Arc::new(config)));
    Ok(())
}

/// A connected client socket.
pub enum Stream {
    /// ws://
    Plain(TcpStream),
    /// wss:// (boxed: the TLS state is large and most runs are plain).
    Tls(Box<TlsStream<TcpStream>>),
}

impl Stream {
    /// Wraps a connected TCP stream, running the TLS handshake when TLS is on.
    pub async fn wrap(tcp: TcpStream) -> Result<Stream> {
        let Some(connector) = CONNECTOR.get() else {
            return Ok(Stream::Plain(tcp));
        };
        let peer = tcp.peer_addr()?.ip();
        let tls = connector
            .connect(ServerName::IpAddress(peer.into()), tcp)
            .await
            .context("TLS handshake")?;
        Ok(Stream::Tls(Box::new(tls)))
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
