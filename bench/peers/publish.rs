//! The reference peers' publish endpoint: a minimal HTTP/1.1 keep-alive
//! server for `POST /api/publish {"topic": ..., "data": ...}` that hands
//! each message's `data` (as JSON text) to the peer's fan-out and answers
//! `200 {}`. No routing, no limits: the load generator is the only client.

use anyhow::Result;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Accepts publisher connections until the listener fails; each message's
/// `data` goes to `fan_out`.
pub async fn publish_loop<F>(admin: TcpListener, fan_out: F)
where
    F: Fn(String) + Clone + Send + 'static,
{
    while let Ok((stream, _)) = admin.accept().await {
        tokio::spawn(serve_publisher(stream, fan_out.clone()));
    }
}

/// One keep-alive publisher connection: request after request until EOF.
async fn serve_publisher<F: Fn(String)>(mut stream: TcpStream, fan_out: F) -> Result<()> {
    let mut buf = Vec::with_capacity(8192);
    let mut chunk = [0u8; 8192];
    loop {
        let head_end = loop {
            if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        while buf.len() < head_end + length {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let body: serde_json::Value = serde_json::from_slice(&buf[head_end..head_end + length])?;
        buf.drain(..head_end + length);
        fan_out(body["data"].to_string());
        let reply = "{}";
        stream
            .write_all(
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{reply}",
                    reply.len()
                )
                .as_bytes(),
            )
            .await?;
    }
}
