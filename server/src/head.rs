//! The head of the first request on a public connection, read by the gateway
//! itself.
//!
//! Nearly every connection to the public listener is one WebSocket upgrade
//! and nothing else. Answering it through hyper costs a second task, hyper's
//! upgrade machinery (a boxed `Upgraded` stream that replays what hyper read
//! ahead) and a second write for the welcome frame: the profile of 15,000
//! handshakes put those at a quarter of the gateway's CPU per handshake
//! (docs/benchmarks.md). So the gateway reads the first head itself; an
//! upgrade is answered directly (by the upgrade module, a layer above) and
//! anything else — another route, HTTP/1.0, a head hyper would refuse — is
//! handed to hyper together with the bytes already read ([`Replay`]), so
//! hyper answers exactly as it would have.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::{HeaderMap, HeaderName, HeaderValue, Method};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// More headers than this and the head is left to hyper (whose own limit is
/// 100, answered with 431).
const MAX_HEADERS: usize = 64;

/// The first read's buffer: an upgrade head from a browser is 400–700 bytes.
const FIRST_READ: usize = 1024;

/// A parsed HTTP/1.1 request head.
#[derive(Debug)]
pub struct RequestHead {
    /// The method.
    pub method: Method,
    /// The request target as sent: path and query.
    pub target: String,
    /// The headers.
    pub headers: HeaderMap,
}

impl RequestHead {
    /// The target's path, without the query.
    pub fn path(&self) -> &str {
        self.target
            .split_once('?')
            .map_or(&self.target, |(path, _)| path)
    }

    /// The target's query, if any.
    pub fn query(&self) -> Option<&str> {
        self.target.split_once('?').map(|(_, query)| query)
    }
}

/// What the bytes read so far hold.
#[derive(Debug)]
pub enum Parsed {
    /// Not a whole head yet.
    Partial,
    /// An HTTP/1.1 head of `len` bytes.
    Complete(RequestHead, usize),
    /// Something for hyper to answer: not HTTP/1.1, malformed, or with more
    /// headers than [`MAX_HEADERS`].
    ForHyper,
}

/// Parses `buf` as the start of a request.
pub fn parse(buf: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let len = match request.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::ForHyper,
    };
    let (Some(method), Some(target), Some(1)) = (request.method, request.path, request.version)
    else {
        return Parsed::ForHyper;
    };
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return Parsed::ForHyper;
    };
    let mut map = HeaderMap::with_capacity(request.headers.len());
    for header in request.headers.iter() {
        let name = HeaderName::from_bytes(header.name.as_bytes());
        let value = HeaderValue::from_bytes(header.value);
        let (Ok(name), Ok(value)) = (name, value) else {
            return Parsed::ForHyper;
        };
        map.append(name, value);
    }
    let head = RequestHead {
        method,
        target: target.to_owned(),
        headers: map,
    };
    Parsed::Complete(head, len)
}

/// What [`read_first`] found.
#[derive(Debug)]
pub struct FirstRead {
    /// Every byte read from the connection.
    pub buffer: Vec<u8>,
    /// What they hold: never [`Parsed::Partial`]; a head still partial at
    /// `max_bytes` is [`Parsed::ForHyper`], for hyper to answer 431.
    pub parsed: Parsed,
}

/// Reads from `io` until the bytes hold a whole head, something for hyper,
/// or `max_bytes`. An error of kind `UnexpectedEof` means the peer went away
/// first.
pub async fn read_first<IO>(io: &mut IO, max_bytes: usize) -> io::Result<FirstRead>
where
    IO: AsyncRead + Unpin,
{
    let mut buffer = Vec::with_capacity(FIRST_READ.min(max_bytes));
    loop {
        if buffer.len() == buffer.capacity() {
            if buffer.len() >= max_bytes {
                let parsed = Parsed::ForHyper;
                return Ok(FirstRead { buffer, parsed });
            }
            buffer.reserve_exact(buffer.len().min(max_bytes - buffer.len()));
        }
        if io.read_buf(&mut buffer).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        match parse(&buffer) {
            Parsed::Partial => continue,
            parsed => return Ok(FirstRead { buffer, parsed }),
        }
    }
}

/// A stream that first replays bytes already read from it, so hyper sees
/// the connection from its first byte.
#[derive(Debug)]
pub struct Replay<IO> {
    replay: Vec<u8>,
    at: usize,
    io: IO,
}

impl<IO> Replay<IO> {
    /// `io`, whose first bytes `replay` were already read from it.
    pub fn new(io: IO, replay: Vec<u8>) -> Self {
        Replay { replay, at: 0, io }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Replay<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.at < this.replay.len() {
            let n = buf.remaining().min(this.replay.len() - this.at);
            buf.put_slice(&this.replay[this.at..this.at + n]);
            this.at += n;
            if this.at == this.replay.len() {
                // Give the buffer back: the connection may live for hours.
                this.replay = Vec::new();
                this.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Replay<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use tokio::io::AsyncWriteExt;

    const UPGRADE: &[u8] = b"GET /ws?ticket=t1 HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\n\
        Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
        Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";

    #[test]
    fn heads_are_told_apart() {
        let many_headers: String = (0..=MAX_HEADERS).map(|i| format!("X-{i}: v\r\n")).collect();
        let many = format!("GET /ws HTTP/1.1\r\n{many_headers}\r\n");
        let table: [(&str, &[u8], &str); 7] = [
            ("whole upgrade", UPGRADE, "complete"),
            ("cut short", &UPGRADE[..40], "partial"),
            ("HTTP/1.0", b"GET /ws HTTP/1.0\r\nHost: gw\r\n\r\n", "hyper"),
            (
                "garbage",
                b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
                "hyper",
            ),
            (
                "bad header name",
                b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
                "hyper",
            ),
            ("too many headers", many.as_bytes(), "hyper"),
            ("no headers", b"GET /healthz HTTP/1.1\r\n\r\n", "complete"),
        ];
        for (name, input, expected) in table {
            let got = match parse(input) {
                Parsed::Partial => "partial",
                Parsed::Complete(..) => "complete",
                Parsed::ForHyper => "hyper",
            };
            assert_eq!(got, expected, "{name}");
        }
    }

    #[test]
    fn a_complete_head_has_its_parts_and_length() {
        let mut input = UPGRADE.to_vec();
        input.extend_from_slice(b"\x81\x85frame");
        let Parsed::Complete(head, len) = parse(&input) else {
            panic!("not complete");
        };
        assert_eq!(len, UPGRADE.len());
        assert_eq!(head.method, Method::GET);
        assert_eq!(head.path(), "/ws");
        assert_eq!(head.query(), Some("ticket=t1"));
        assert_eq!(head.headers.len(), 5);
        assert_eq!(head.headers["upgrade"], "websocket");
    }

    #[tokio::test]
    async fn a_head_arriving_in_pieces_is_read_whole() {
        let (mut client, mut server) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            for piece in UPGRADE.chunks(7) {
                client.write_all(piece).await.expect("write");
                tokio::task::yield_now().await;
            }
            client
        });
        let read = read_first(&mut server, 16 * 1024).await.expect("read");
        assert!(matches!(read.parsed, Parsed::Complete(_, len) if len == UPGRADE.len()));
        assert_eq!(read.buffer, UPGRADE);
        drop(writer.await);
    }

    #[tokio::test]
    async fn a_head_without_an_end_stops_at_the_limit() {
        let endless = [b"GET / HTTP/1.1\r\nX: ".as_slice(), &[b'a'; 20_000]].concat();
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        client.write_all(&endless).await.expect("write");
        let read = read_first(&mut server, 8192).await.expect("read");
        assert!(matches!(read.parsed, Parsed::ForHyper));
        assert_eq!(read.buffer.len(), 8192);
    }

    #[tokio::test]
    async fn a_peer_that_leaves_mid_head_is_an_eof() {
        let (mut client, mut server) = tokio::io::duplex(1024);
        client.write_all(&UPGRADE[..30]).await.expect("write");
        drop(client);
        let err = read_first(&mut server, 8192).await.expect_err("eof");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[tokio::test]
    async fn replay_gives_the_read_bytes_then_the_stream() {
        let (mut client, server) = tokio::io::duplex(1024);
        client.write_all(b" world").await.expect("write");
        drop(client);
        let mut replay = Replay::new(server, b"hello".to_vec());
        let mut all = String::new();
        replay.read_to_string(&mut all).await.expect("read");
        assert_eq!(all, "hello world");
    }
}
