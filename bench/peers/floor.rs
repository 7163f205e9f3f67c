//! Reference floor: the cheapest fan-out this machine can do over the same
//! WebSocket connections, to tell what the hardware allows from what a
//! server's design costs (bench/floor.sh).
//!
//! Every published message (`POST /api/publish` on the admin port, as the
//! other peers) is encoded once and appended to one log of frames. Sender
//! threads own the connections and walk them in turn: each connection gets
//! everything it has not had yet in one `write` system call, straight from
//! the log. No task, channel, wake or copy per subscriber: what is left per
//! delivery is the system call and the kernel's TCP work, which on loopback
//! includes the receiver's side. Nothing else is served (no pings, no
//! reads after the handshake), and the log is never trimmed: a bench peer
//! for runs of seconds, not a server.

use std::io::{ErrorKind, Write};
use std::net::SocketAddr;
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

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
    /// Sender threads; connections are dealt to them in turn.
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

/// Every message published so far, as WebSocket frames back to back. A
/// connection's position is a byte offset into it, so a partial write is a
/// position that moved less, and a connection that fell behind gets all it
/// missed in one write.
#[derive(Default)]
struct FrameLog {
    bytes: Mutex<Arc<Vec<u8>>>,
    grew: Condvar,
}

impl FrameLog {
    /// Appends `data` as one unmasked text frame and wakes the senders.
    fn append(&self, data: &str) {
        let mut bytes = self.bytes.lock().expect("frame log");
        // Copies the log only while a sender still holds the last snapshot.
        let log = Arc::make_mut(&mut bytes);
        encode_text_frame(log, data.as_bytes());
        self.grew.notify_all();
    }

    /// The log's length now: where a subscriber joining now starts.
    fn len(&self) -> usize {
        self.bytes.lock().expect("frame log").len()
    }

    /// The log as it is now; appends after this do not change it.
    fn snapshot(&self) -> Arc<Vec<u8>> {
        self.bytes.lock().expect("frame log").clone()
    }

    /// Waits (at most `timeout`) until the log is longer than `seen` bytes.
    fn wait_past(&self, seen: usize, timeout: Duration) {
        let bytes = self.bytes.lock().expect("frame log");
        let _unused = self
            .grew
            .wait_timeout_while(bytes, timeout, |bytes| bytes.len() <= seen)
            .expect("frame log");
    }
}

/// RFC 6455 §5.2: FIN + text opcode, the payload length in 7, 16 or 64 bits,
/// no mask (server to client).
fn encode_text_frame(out: &mut Vec<u8>, payload: &[u8]) {
    out.push(0x81);
    match payload.len() {
        len @ 0..=125 => out.push(len as u8),
        len @ 126..=0xFFFF => {
            out.push(126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        len => {
            out.push(127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(payload);
}

/// One subscriber: its socket and how much of the log it has been sent.
struct Subscriber {
    socket: std::net::TcpStream,
    sent: usize,
}

/// A sender thread: walks its subscribers, writing each one's unsent part
/// of the log in one call, until every one is up to date; then sleeps until
/// the next publish (or 50 ms, to take in new connections).
fn send_loop(log: Arc<FrameLog>, joined: mpsc::Receiver<Subscriber>) {
    let mut subscribers: Vec<Subscriber> = Vec::new();
    loop {
        let frames = log.snapshot();
        subscribers.extend(joined.try_iter());
        let (mut behind, mut progressed) = (false, false);
        subscribers.retain_mut(|subscriber| {
            if subscriber.sent == frames.len() {
                return true;
            }
            match subscriber.socket.write(&frames[subscriber.sent..]) {
                Ok(n) => {
                    subscriber.sent += n;
                    progressed |= n > 0;
                    behind |= subscriber.sent < frames.len();
                    true
                }
                Err(err) if err.kind() == ErrorKind::WouldBlock => {
                    behind = true;
                    true
                }
                // Gone (reset, broken pipe): drop it.
                Err(_) => false,
            }
        });
        if !behind {
            log.wait_past(frames.len(), Duration::from_millis(50));
        } else if !progressed {
            // Every socket that is behind is full: let the readers catch up.
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// Answers the WebSocket upgrade (no checks beyond the key): the subscriber
/// for a sender thread.
async fn upgrade(mut stream: TcpStream, log: &FrameLog) -> Result<Subscriber> {
    stream.set_nodelay(true)?;
    let mut head = Vec::with_capacity(1024);
    let key = loop {
        let mut chunk = [0u8; 1024];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            bail!("closed before the request head ended");
        }
        head.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut request = httparse::Request::new(&mut headers);
        if request.parse(&head)?.is_complete() {
            let key = request
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("sec-websocket-key"))
                .context("no Sec-WebSocket-Key")?;
            break derive_accept_key(key.value);
        }
        if head.len() > 16 * 1024 {
            bail!("request head too long");
        }
    };
    // What is published once the client has its 101 is the client's, even
    // if the sender thread takes the socket in later.
    let sent = log.len();
    stream
        .write_all(
            format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {key}\r\n\r\n"
            )
            .as_bytes(),
        )
        .await?;
    // Stays non-blocking: the sender threads write with `WouldBlock`.
    Ok(Subscriber {
        socket: stream.into_std()?,
        sent,
    })
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args = Args::parse();
    let log = Arc::new(FrameLog::default());
    let mut senders = Vec::new();
    for _ in 0..args.threads.max(1) {
        let (tx, rx) = mpsc::channel();
        let log = log.clone();
        std::thread::spawn(move || send_loop(log, rx));
        senders.push(tx);
    }
    let listener = TcpListener::bind(args.listen).await.context("listen")?;
    let admin = TcpListener::bind(args.admin).await.context("admin")?;
    let fan_out = {
        let log = log.clone();
        move |data: String| log.append(&data)
    };
    tokio::spawn(publish::publish_loop(admin, fan_out));
    eprintln!(
        "floor peer listening on {} (admin {}, {} sender threads)",
        args.listen,
        args.admin,
        senders.len()
    );
    for sender in senders.iter().cycle() {
        let (tcp, _) = listener.accept().await?;
        let (sender, log) = (sender.clone(), log.clone());
        tokio::spawn(async move {
            if let Ok(subscriber) = upgrade(tcp, &log).await {
                let _ = sender.send(subscriber);
            }
        });
    }
    unreachable!("cycle over a non-empty list never ends")
}

#[cfg(test)]
mod tests {
    use super::encode_text_frame;

    #[test]
    fn frames_carry_the_length_in_the_smallest_form() {
        for (len, header) in [
            (5, vec![0x81, 5]),
            (125, vec![0x81, 125]),
            (126, vec![0x81, 126, 0, 126]),
            (70_000, vec![0x81, 127, 0, 0, 0, 0, 0, 1, 0x11, 0x70]),
        ] {
            let mut out = Vec::new();
            encode_text_frame(&mut out, &vec![b'x'; len]);
            assert_eq!(out[..header.len()], header[..], "length {len}");
            assert_eq!(out.len(), header.len() + len);
        }
    }
}
