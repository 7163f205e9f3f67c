//! WebSocket framing by hand, for frames no well-behaved client would
//! send, and the wait for a client's next frame.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{bail, Result};

/// A WebSocket spoken by hand, for sending frames no library would send.
pub struct RawSocket {
    stream: TcpStream,
}

/// Opcodes of RFC 6455.
pub mod opcode {
    /// Text frame.
    pub const TEXT: u8 = 0x1;
    /// Binary frame.
    pub const BINARY: u8 = 0x2;
    /// Close frame.
    pub const CLOSE: u8 = 0x8;
}

impl RawSocket {
    /// Connects and completes the upgrade handshake on `path`.
    pub fn connect(addr: SocketAddr, path: &str) -> Result<RawSocket> {
        let mut stream = TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )?;
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            stream.read_exact(&mut byte)?;
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head);
        if !head.starts_with("HTTP/1.1 101") {
            bail!("upgrade refused: {head}");
        }
        Ok(RawSocket { stream })
    }

    /// A second handle on the underlying TCP stream, for reading raw bytes.
    pub fn try_clone_stream(&self) -> Result<TcpStream> {
        Ok(self.stream.try_clone()?)
    }

    /// Sends raw bytes.
    pub fn send_bytes(&mut self, bytes: &[u8]) -> Result<()> {
        self.stream.write_all(bytes)?;
        Ok(())
    }

    /// Sends one masked frame with the FIN bit set.
    pub fn send_frame(&mut self, opcode: u8, payload: &[u8]) -> Result<()> {
        self.send_bytes(&client_frame(opcode, payload))
    }

    /// Reads server frames until a close frame; returns its code (1005 if
    /// none) or `None` if the socket ends first.
    pub fn read_close_code(&mut self) -> Result<Option<u16>> {
        loop {
            let mut header = [0u8; 2];
            if self.stream.read_exact(&mut header).is_err() {
                return Ok(None);
            }
            let opcode = header[0] & 0x0f;
            let len = match header[1] & 0x7f {
                126 => {
                    let mut ext = [0u8; 2];
                    self.stream.read_exact(&mut ext)?;
                    u16::from_be_bytes(ext) as usize
                }
                127 => {
                    let mut ext = [0u8; 8];
                    self.stream.read_exact(&mut ext)?;
                    u64::from_be_bytes(ext) as usize
                }
                short => short as usize,
            };
            let mut payload = vec![0u8; len];
            self.stream.read_exact(&mut payload)?;
            if opcode == opcode::CLOSE {
                return Ok(Some(if payload.len() >= 2 {
                    u16::from_be_bytes([payload[0], payload[1]])
                } else {
                    1005
                }));
            }
        }
    }
}

/// Encodes a masked client frame (FIN set).
pub fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![0x80 | opcode];
    match payload.len() {
        len @ 0..=125 => frame.push(0x80 | len as u8),
        len @ 126..=65535 => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(len as u16).to_be_bytes());
        }
        len => {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// How long a test waits for any one expected frame.
pub const STEP: Duration = Duration::from_secs(15);

/// The next frame on `conn`, panicking on a close or after [`STEP`].
pub async fn next_frame(
    conn: &mut switchyard_client::Connection,
) -> switchyard_protocol::ServerFrame {
    match tokio::time::timeout(STEP, conn.next_event()).await {
        Ok(Ok(switchyard_client::Event::Frame(frame))) => frame,
        other => panic!("expected a frame, got {other:?}"),
    }
}
