//! The load generator's own WebSocket client, used by every workload.
//!
//! The load generator shares the machine's two cores with the server it
//! measures, so every microsecond it spends per message is taken from the
//! server. Profiled at 1M deliveries/s (`PERF=load bench/cpu.sh 100`), the
//! general client (tokio-tungstenite) spent most of its time per message on
//! work a measurement does not need: a waker registered per poll, UTF-8
//! validation, an owned buffer per frame, a substring search set up per
//! message. This client reads whole segments into one buffer and hands out
//! the frames in it as borrowed slices, so a read of many frames costs one
//! system call, one clock read and no allocation.
//!
//! It is a client for servers this repository tests, not a general one: it
//! expects unfragmented frames from the server (every server here sends
//! whole messages) and refuses anything else with an error rather than
//! guessing.

use std::sync::OnceLock;

use anyhow::{bail, ensure, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::http::HeaderValue;

use crate::stream::Stream;

/// Text frame opcode.
pub const TEXT: u8 = 0x1;
/// Close frame opcode.
pub const CLOSE: u8 = 0x8;
/// Ping frame opcode.
pub const PING: u8 = 0x9;
/// Pong frame opcode.
pub const PONG: u8 = 0xA;

/// Every handshake sends this key (the RFC 6455 example). A load generator
/// has no cache to defeat; the server hashes whatever key it is given, so
/// the server's work is the same, and the expected accept is computed once.
const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// The largest frame accepted from a server; the workloads send ~200 bytes.
const MAX_FRAME: usize = 1 << 20;

/// The read buffer's starting size (grown only for a frame that needs it).
const READ_BUFFER: usize = 4096;

/// The mask of every client frame. RFC 6455 asks clients for unpredictable
/// masks to protect proxies from cache poisoning; on loopback, against our
/// own servers, a fixed one costs the server the same unmasking work.
const MASK: [u8; 4] = [0x5a, 0x17, 0xc3, 0x9e];

/// One frame from the server, borrowed from the socket's read buffer.
#[derive(Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    /// The opcode (`TEXT`, `BINARY`, `CLOSE`, `PING`, `PONG`).
    pub opcode: u8,
    /// The unmasked payload.
    pub payload: &'a [u8],
}

/// A whole frame in a buffer: its opcode and its payload's range (whose end
/// is the frame's length).
type Located = (u8, std::ops::Range<usize>);

/// Where the next whole frame in a buffer is; `None` when more bytes are
/// needed.
fn locate(bytes: &[u8]) -> Result<Option<Located>> {
    let [first, second, ..] = *bytes else {
        return Ok(None);
    };
    ensure!(first & 0x80 != 0, "fragmented frame from the server");
    ensure!(
        first & 0x70 == 0,
        "reserved bits set (no extension was agreed)"
    );
    ensure!(second & 0x80 == 0, "masked frame from the server");
    let (length, header) = match second & 0x7f {
        126 if bytes.len() >= 4 => (u16::from_be_bytes([bytes[2], bytes[3]]) as usize, 4),
        127 if bytes.len() >= 10 => {
            let mut length = [0u8; 8];
            length.copy_from_slice(&bytes[2..10]);
            let length = u64::from_be_bytes(length);
            (usize::try_from(length).unwrap_or(usize::MAX), 10)
        }
        126 | 127 => return Ok(None),
        short => (short as usize, 2),
    };
    ensure!(
        length <= MAX_FRAME,
        "frame of {length} bytes from the server"
    );
    if bytes.len() < header + length {
        return Ok(None);
    }
    Ok(Some((first & 0x0f, header..header + length)))
}

/// A client frame: FIN, `opcode`, masked `payload`.
pub fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(payload.len() + 14);
    frame.push(0x80 | opcode);
    match payload.len() {
        n if n < 126 => frame.push(0x80 | n as u8),
        n if n <= u16::MAX as usize => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(&MASK);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
    frame
}

/// The upgrade request for `path` on `host`.
fn upgrade_request(host: &str, path: &str, authorization: Option<&HeaderValue>) -> Vec<u8> {
    let mut request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n"
    )
    .into_bytes();
    if let Some(value) = authorization {
        request.extend_from_slice(b"Authorization: ");
        request.extend_from_slice(value.as_bytes());
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"\r\n");
    request
}

/// Checks a complete response head: a 101 with the accept for `KEY`.
/// Returns the head's length, or `None` while it is incomplete.
fn check_response(bytes: &[u8]) -> Result<Option<usize>> {
    static ACCEPT: OnceLock<String> = OnceLock::new();
    let accept = ACCEPT.get_or_init(|| derive_accept_key(KEY.as_bytes()));
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    let httparse::Status::Complete(length) = response.parse(bytes).context("response head")? else {
        return Ok(None);
    };
    let code = response.code.unwrap_or(0);
    ensure!(code == 101, "the server answered {code}, not 101");
    let accepted = response.headers.iter().any(|h| {
        h.name.eq_ignore_ascii_case("sec-websocket-accept") && h.value == accept.as_bytes()
    });
    ensure!(accepted, "missing or wrong Sec-WebSocket-Accept");
    Ok(Some(length))
}

/// An upgraded connection with its read buffer.
pub struct Socket {
    stream: Stream,
    buf: Vec<u8>,
    /// Bytes of `buf` already handed out as frames.
    start: usize,
    /// Bytes of `buf` read from the stream.
    end: usize,
}

impl Socket {
    /// Runs the upgrade for `path` on a connected `stream`; `host` is the
    /// Host header. Bytes the server sent behind its 101 (a welcome frame in
    /// the same segment) stay buffered as the first frames.
    pub async fn upgrade(
        stream: Stream,
        host: &str,
        path: &str,
        authorization: Option<&HeaderValue>,
    ) -> Result<Socket> {
        let mut socket = Socket {
            stream,
            buf: vec![0; READ_BUFFER],
            start: 0,
            end: 0,
        };
        socket
            .write(&upgrade_request(host, path, authorization))
            .await?;
        loop {
            if let Some(head) = check_response(&socket.buf[..socket.end])? {
                socket.start = head;
                return Ok(socket);
            }
            ensure!(socket.end < socket.buf.len(), "response head too large");
            if !socket.fill().await? {
                bail!("the server closed during the handshake");
            }
        }
    }

    /// The next whole frame already buffered, if any; never reads.
    pub fn next_buffered(&mut self) -> Result<Option<Frame<'_>>> {
        Ok(locate(&self.buf[self.start..self.end])?.map(|found| self.take(found)))
    }

    /// The next frame, reading as needed; `None` at end of stream.
    /// Cancel-safe (for `select!`): a frame is consumed only when returned,
    /// and bytes only when read into the buffer.
    pub async fn next(&mut self) -> Result<Option<Frame<'_>>> {
        let found = loop {
            if let Some(found) = locate(&self.buf[self.start..self.end])? {
                break found;
            }
            if !self.fill().await? {
                return Ok(None);
            }
        };
        Ok(Some(self.take(found)))
    }

    /// Hands out a located frame and moves past it.
    fn take(&mut self, (opcode, payload): Located) -> Frame<'_> {
        let at = self.start;
        self.start += payload.end;
        Frame {
            opcode,
            payload: &self.buf[at + payload.start..at + payload.end],
        }
    }

    /// Reads what the stream has into the buffer (making room first);
    /// `false` at end of stream.
    pub async fn fill(&mut self) -> Result<bool> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.buf.len() {
            // A frame larger than the buffer: grow to fit it (bounded by
            // MAX_FRAME in `locate`).
            let len = self.buf.len() * 2;
            self.buf.resize(len, 0);
        }
        let n = self.stream.read(&mut self.buf[self.end..]).await?;
        self.end += n;
        Ok(n > 0)
    }

    /// Sends one masked frame.
    pub async fn send(&mut self, opcode: u8, payload: &[u8]) -> Result<()> {
        self.write(&client_frame(opcode, payload)).await
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.stream.write_all(bytes).await?;
        // TLS buffers its records until flushed.
        self.stream.flush().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BINARY: u8 = 0x2;

    fn server_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut frame = vec![0x80 | opcode];
        match payload.len() {
            n if n < 126 => frame.push(n as u8),
            n if n <= u16::MAX as usize => {
                frame.push(126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                frame.push(127);
                frame.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        frame.extend_from_slice(payload);
        frame
    }

    #[test]
    fn frames_are_located_only_when_whole() {
        let long = vec![b'x'; 300];
        let huge = vec![b'y'; 70_000];
        let cases: Vec<(Vec<u8>, Option<Located>)> = vec![
            (vec![], None),
            (vec![0x81], None),
            (server_frame(TEXT, b"hi"), Some((TEXT, 2..4))),
            (server_frame(TEXT, b"hi")[..3].to_vec(), None),
            (server_frame(PING, b""), Some((PING, 2..2))),
            (server_frame(BINARY, &long), Some((BINARY, 4..304))),
            (server_frame(BINARY, &long)[..3].to_vec(), None),
            (server_frame(BINARY, &long)[..303].to_vec(), None),
            (server_frame(TEXT, &huge), Some((TEXT, 10..70_010))),
            (server_frame(TEXT, &huge)[..9].to_vec(), None),
        ];
        for (bytes, expected) in cases {
            assert_eq!(
                locate(&bytes).expect("valid"),
                expected,
                "{:?}",
                &bytes[..bytes.len().min(12)]
            );
        }
    }

    #[test]
    fn frames_the_client_cannot_follow_are_errors() {
        let cases: [(&[u8], &str); 4] = [
            (&[0x01, 0x00], "fragmented"),
            (&[0xc1, 0x00], "reserved bits"),
            (&[0x81, 0x80, 0, 0, 0, 0], "masked"),
            (
                &[0x81, 127, 0, 0, 0, 0, 0x10, 0, 0, 0],
                "bytes from the server",
            ),
        ];
        for (bytes, message) in cases {
            let err = locate(bytes).expect_err(message).to_string();
            assert!(err.contains(message), "{err}");
        }
    }

    #[test]
    fn client_frames_are_masked_and_decode_back() {
        for length in [0usize, 5, 125, 126, 65_535, 65_536] {
            let payload: Vec<u8> = (0..length).map(|i| (i % 251) as u8).collect();
            let frame = client_frame(TEXT, &payload);
            assert_eq!(frame[0], 0x81);
            assert_eq!(frame[1] & 0x80, 0x80, "mask bit");
            let header = match length {
                0..=125 => 2,
                126..=65_535 => 4,
                _ => 10,
            };
            let mask = &frame[header..header + 4];
            let decoded: Vec<u8> = frame[header + 4..]
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ mask[i % 4])
                .collect();
            assert_eq!(decoded, payload, "length {length}");
        }
    }

    #[test]
    fn the_response_must_be_a_101_with_the_right_accept() {
        let good = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                    Connection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
        assert_eq!(
            check_response(good.as_bytes()).expect("ok"),
            Some(good.len())
        );
        assert_eq!(check_response(&good.as_bytes()[..40]).expect("ok"), None);
        let wrong = good.replace("s3pP", "AAAA");
        assert!(check_response(wrong.as_bytes()).is_err());
        let refused = "HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n";
        let err = check_response(refused.as_bytes())
            .expect_err("403")
            .to_string();
        assert!(err.contains("403"), "{err}");
    }
}
