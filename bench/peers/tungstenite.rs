//! Reference peer: a bare tokio-tungstenite broadcast server, the floor of
//! what the library costs, to compare Switchyard against (bench/compare.sh).
//!
//! Every connection receives every message published with
//! `POST /api/publish {"topic": ..., "data": ...}` on the admin port (the
//! `data` JSON, as text). No topics, no history, no limits. Variants:
//! `--read-buffer 0` keeps tungstenite's default 128 KiB read buffer;
//! `--batch` writes whatever is queued and flushes once, otherwise each
//! message is one `send` (write + flush); `--tls-cert/--tls-key` serve wss://.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

#[path = "publish.rs"]
mod publish;

#[derive(Parser)]
struct Args {
    /// WebSocket listener.
    #[arg(long)]
    listen: SocketAddr,
    /// Publish listener (`POST /api/publish`).
    #[arg(long)]
    admin: SocketAddr,
    /// Read and write buffer bytes per connection; 0 keeps tungstenite's defaults.
    #[arg(long, default_value_t = 4096)]
    buffer: usize,
    /// Batch queued messages into one flush.
    #[arg(long)]
    batch: bool,
    /// TLS (wss://): the certificate chain (PEM); needs --tls-key.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// TLS: the private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
}

/// The TLS acceptor for --tls-cert/--tls-key, set up the way the gateway
/// does it (rustls on ring, HTTP/1.1 only).
fn acceptor(args: &Args) -> Result<Option<TlsAcceptor>> {
    let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) else {
        return Ok(None);
    };
    let certs = CertificateDer::pem_file_iter(cert)
        .context("--tls-cert")?
        .collect::<Result<Vec<_>, _>>()
        .context("--tls-cert")?;
    let key = PrivateKeyDer::from_pem_file(key).context("--tls-key")?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("TLS certificate")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Some(TlsAcceptor::from(Arc::new(config))))
}

type Subscribers = Arc<Mutex<Vec<mpsc::UnboundedSender<Utf8Bytes>>>>;

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let config = if args.buffer == 0 {
        WebSocketConfig::default()
    } else {
        WebSocketConfig::default()
            .read_buffer_size(args.buffer)
            .write_buffer_size(args.buffer)
    };
    let subscribers: Subscribers = Arc::default();
    let listener = TcpListener::bind(args.listen).await.context("listen")?;
    let admin = TcpListener::bind(args.admin).await.context("admin")?;
    let fan_out = {
        let subscribers = subscribers.clone();
        move |data: String| {
            let text = Utf8Bytes::from(data);
            subscribers
                .lock()
                .expect("subscribers")
                .retain(|tx| tx.send(text.clone()).is_ok());
        }
    };
    tokio::spawn(publish::publish_loop(admin, fan_out));
    eprintln!("peer listening on {} (admin {})", args.listen, args.admin);
    let tls = acceptor(&args)?;
    loop {
        let (tcp, _) = listener.accept().await?;
        let _ = tcp.set_nodelay(true);
        let (subscribers, batch) = (subscribers.clone(), args.batch);
        // Two spawns, not one task with both branches: a task is sized for
        // the largest thing it awaits, and the TLS handshake state would
        // widen every plain connection (measured: 8.8 → 19 KiB each).
        match tls.clone() {
            None => {
                tokio::spawn(serve(tcp, config, subscribers, batch));
            }
            Some(tls) => {
                tokio::spawn(async move {
                    if let Ok(tls) = tls.accept(tcp).await {
                        serve(tls, config, subscribers, batch).await
                    }
                });
            }
        }
    }
}

/// One connection: receives every published message until it goes away.
async fn serve<S>(io: S, config: WebSocketConfig, subscribers: Subscribers, batch: bool)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Ok(ws) = tokio_tungstenite::accept_async_with_config(io, Some(config)).await else {
        return;
    };
    let (mut sink, mut stream) = ws.split();
    let (tx, mut rx) = mpsc::unbounded_channel::<Utf8Bytes>();
    subscribers.lock().expect("subscribers").push(tx);
    let writer = tokio::spawn(async move {
        while let Some(text) = rx.recv().await {
            let sent = if batch {
                let mut result = sink.feed(Message::Text(text)).await;
                while let (Ok(()), Ok(more)) = (&result, rx.try_recv()) {
                    result = sink.feed(Message::Text(more)).await;
                }
                match result {
                    Ok(()) => sink.flush().await,
                    err => err,
                }
            } else {
                sink.send(Message::Text(text)).await
            };
            if sent.is_err() {
                return;
            }
        }
    });
    // Reading answers pings (tungstenite queues the pong) and notices the end.
    while let Some(Ok(_)) = stream.next().await {}
    writer.abort();
}
