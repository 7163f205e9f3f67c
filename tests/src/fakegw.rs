//! A scripted gateway: a real WebSocket listener whose every connection the
//! test plays by hand — welcome or refuse, answer subscribes, send messages,
//! `migrate`, malformed or unknown frames, close with any code and reason,
//! or drop the TCP connection without a close frame. What the clients do in
//! the corners of the protocol is tested against it (the real gateway only
//! takes the paths it is built to take).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// How long a [`FakeConn`] waits for the client's next frame.
const RECEIVE: Duration = Duration::from_secs(5);

/// The listener; connections arrive as [`FakeConn`]s, in order.
pub struct FakeGateway {
    /// Where clients connect (`ws://ADDR/ws`).
    pub addr: SocketAddr,
    accepted: mpsc::UnboundedReceiver<FakeConn>,
    /// Holds the next upgrades: a connection waits (TCP open, handshake
    /// unanswered) while this is set.
    hold: Arc<Mutex<bool>>,
    accept: tokio::task::JoinHandle<()>,
}

/// One client connection, the server side played by the test.
pub struct FakeConn {
    socket: WebSocketStream<TcpStream>,
    /// The handshake's request URI (`/ws?ticket=…`).
    pub uri: String,
    /// The handshake's `Authorization` header, if any.
    pub authorization: Option<String>,
}

impl FakeGateway {
    /// Listens on an ephemeral loopback port.
    pub async fn start() -> Result<FakeGateway> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (tx, accepted) = mpsc::unbounded_channel();
        let hold = Arc::new(Mutex::new(false));
        let held = hold.clone();
        let accept = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let tx = tx.clone();
                let held = held.clone();
                tokio::spawn(async move {
                    while *held.lock().expect("hold") {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    if let Ok(conn) = FakeConn::upgrade(stream).await {
                        let _ = tx.send(conn);
                    }
                });
            }
        });
        Ok(FakeGateway {
            addr,
            accepted,
            hold,
            accept,
        })
    }

    /// `ws://ADDR/ws`.
    pub fn url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// While `on`, new connections wait with their handshake unanswered.
    pub fn hold_upgrades(&self, on: bool) {
        *self.hold.lock().expect("hold") = on;
    }

    /// The next connection, within `wait`.
    pub async fn next(&mut self, wait: Duration) -> Result<FakeConn> {
        tokio::time::timeout(wait, self.accepted.recv())
            .await
            .map_err(|_| anyhow!("no connection within {wait:?}"))?
            .context("the listener stopped")
    }

    /// Whether a connection arrives within `wait` (it is dropped).
    pub async fn connects_within(&mut self, wait: Duration) -> bool {
        self.next(wait).await.is_ok()
    }
}

impl Drop for FakeGateway {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl FakeConn {
    // The handshake callback's error type is tungstenite's (an HTTP
    // response); this one never fails.
    #[allow(clippy::result_large_err)]
    async fn upgrade(stream: TcpStream) -> Result<FakeConn> {
        let seen: Arc<Mutex<(String, Option<String>)>> = Arc::default();
        let record = seen.clone();
        let socket = tokio_tungstenite::accept_hdr_async(
            stream,
            move |request: &Request, response: Response| {
                let authorization = request
                    .headers()
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                *record.lock().expect("seen") = (request.uri().to_string(), authorization);
                Ok(response)
            },
        )
        .await?;
        let (uri, authorization) = seen.lock().expect("seen").clone();
        Ok(FakeConn {
            socket,
            uri,
            authorization,
        })
    }

    /// Sends a JSON frame.
    pub async fn send(&mut self, frame: Value) -> Result<()> {
        self.socket.send(Message::text(frame.to_string())).await?;
        Ok(())
    }

    /// Sends text as is (malformed frames).
    pub async fn send_raw(&mut self, text: &str) -> Result<()> {
        self.socket.send(Message::text(text.to_string())).await?;
        Ok(())
    }

    /// Sends a binary frame.
    pub async fn send_binary(&mut self, bytes: &[u8]) -> Result<()> {
        self.socket.send(Message::binary(bytes.to_vec())).await?;
        Ok(())
    }

    /// `welcome` as server `server_id`, with a heartbeat interval.
    pub async fn welcome(&mut self, server_id: &str, heartbeat_ms: u64) -> Result<()> {
        self.send(
            json!({"op": "welcome", "connection_id": format!("{server_id}-conn"),
                         "server_id": server_id, "heartbeat_ms": heartbeat_ms}),
        )
        .await
    }

    /// `subscribed` for `topic` at (epoch, offset).
    pub async fn subscribed(
        &mut self,
        topic: &str,
        epoch: u64,
        offset: u64,
        recovered: bool,
    ) -> Result<()> {
        self.send(json!({"op": "subscribed", "topic": topic,
                         "position": {"epoch": epoch, "offset": offset}, "recovered": recovered}))
            .await
    }

    /// A message on `topic` at (epoch, offset), data `{"n": offset}`.
    pub async fn message(&mut self, topic: &str, epoch: u64, offset: u64) -> Result<()> {
        self.send(
            json!({"op": "message", "topic": topic, "epoch": epoch, "offset": offset,
                         "data": {"n": offset}}),
        )
        .await
    }

    /// Closes with `code` and `reason` (JSON text such as `{"retry_ms": 50}`).
    pub async fn close(&mut self, code: u16, reason: &str) -> Result<()> {
        self.socket
            .close(Some(CloseFrame {
                code: CloseCode::from(code),
                reason: reason.to_string().into(),
            }))
            .await?;
        Ok(())
    }

    /// Ends the TCP connection without a close frame (a crash).
    pub fn drop_tcp(self) {
        drop(self);
    }

    /// The client's next JSON frame (pings answered silently are skipped
    /// when `skip_pings`), or an error when it closed or stayed silent.
    pub async fn recv(&mut self) -> Result<Value> {
        loop {
            let message = tokio::time::timeout(RECEIVE, self.socket.next())
                .await
                .map_err(|_| anyhow!("the client sent nothing within {RECEIVE:?}"))?;
            match message {
                Some(Ok(Message::Text(text))) => {
                    let value: Value = serde_json::from_str(&text)?;
                    if value["op"] == "ping" {
                        continue;
                    }
                    return Ok(value);
                }
                Some(Ok(Message::Close(frame))) => {
                    bail!(
                        "closed by the client: {:?}",
                        frame.map(|f| u16::from(f.code))
                    )
                }
                Some(Ok(_)) => continue,
                Some(Err(err)) => bail!("{err}"),
                None => bail!("the client went away"),
            }
        }
    }

    /// Reads the client's frames until one with `op` (and `topic`, if given).
    pub async fn expect(&mut self, op: &str, topic: Option<&str>) -> Result<Value> {
        loop {
            let frame = self.recv().await?;
            if frame["op"] == op && topic.is_none_or(|t| frame["topic"] == t) {
                return Ok(frame);
            }
        }
    }

    /// The close code the client sends, reading past any other frame
    /// (`None` if the connection ended without a close frame).
    pub async fn closed_by_client(&mut self) -> Result<Option<u16>> {
        loop {
            let message = tokio::time::timeout(RECEIVE, self.socket.next())
                .await
                .map_err(|_| anyhow!("the client did not close within {RECEIVE:?}"))?;
            match message {
                Some(Ok(Message::Close(frame))) => return Ok(frame.map(|f| u16::from(f.code))),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return Ok(None),
            }
        }
    }
}

/// What a served connection reports to the test.
#[derive(Debug, Clone, PartialEq)]
pub enum ConnEvent {
    /// A frame from the client (pings included).
    Frame(Value),
    /// The connection ended: the client's close code, or `None` without one.
    Closed(Option<u16>),
}

enum Command {
    Send(String),
    Binary(Vec<u8>),
    Close(u16, String),
    Drop,
    Freeze,
}

/// A connection served by its own task (see [`FakeConn::serve`]): what the
/// test tells it to send, it sends in order.
#[derive(Clone)]
pub struct ConnHandle {
    commands: mpsc::UnboundedSender<Command>,
}

impl ConnHandle {
    /// Sends a JSON frame.
    pub fn send(&self, frame: Value) {
        let _ = self.commands.send(Command::Send(frame.to_string()));
    }

    /// Sends text as is.
    pub fn send_raw(&self, text: &str) {
        let _ = self.commands.send(Command::Send(text.to_string()));
    }

    /// Sends a binary frame.
    pub fn send_binary(&self, bytes: &[u8]) {
        let _ = self.commands.send(Command::Binary(bytes.to_vec()));
    }

    /// Closes with `code` and `reason`.
    pub fn close(&self, code: u16, reason: &str) {
        let _ = self.commands.send(Command::Close(code, reason.to_string()));
    }

    /// Ends the TCP connection without a close frame.
    pub fn drop_tcp(&self) {
        let _ = self.commands.send(Command::Drop);
    }

    /// Goes silent with the TCP connection open, as a half-open connection
    /// looks from the client (NAT dropped it, the host lost power): nothing
    /// is sent or read any more. Reported closed when the client closes it.
    pub fn freeze(&self) {
        let _ = self.commands.send(Command::Freeze);
    }
}

impl FakeConn {
    /// Serves this connection from a task of its own: the client's frames
    /// and its end go to `events` tagged with `id`; the returned handle
    /// sends. Used where many connections are played at once.
    pub fn serve(self, id: usize, events: mpsc::UnboundedSender<(usize, ConnEvent)>) -> ConnHandle {
        let (commands, mut requests) = mpsc::unbounded_channel();
        let mut socket = self.socket;
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    request = requests.recv() => match request {
                        Some(Command::Send(text)) => {
                            if socket.send(Message::text(text)).await.is_err() { break; }
                        }
                        Some(Command::Binary(bytes)) => {
                            if socket.send(Message::binary(bytes)).await.is_err() { break; }
                        }
                        Some(Command::Close(code, reason)) => {
                            let _ = socket.close(Some(CloseFrame { code: CloseCode::from(code), reason: reason.into() })).await;
                            // Read on until the client answers the close.
                            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                                while let Some(Ok(message)) = socket.next().await {
                                    if matches!(message, Message::Close(_)) { break; }
                                }
                            }).await;
                            let _ = events.send((id, ConnEvent::Closed(None)));
                            return;
                        }
                        Some(Command::Drop) | None => {
                            let _ = events.send((id, ConnEvent::Closed(None)));
                            return;
                        }
                        Some(Command::Freeze) => {
                            // Hold the socket unread until the client gives
                            // up on it (its TCP close, seen by a peek).
                            let mut probe = [0u8; 1];
                            loop {
                                match socket.get_ref().peek(&mut probe).await {
                                    Ok(0) | Err(_) => break,
                                    Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                                }
                            }
                            let _ = events.send((id, ConnEvent::Closed(None)));
                            return;
                        }
                    },
                    message = socket.next() => match message {
                        Some(Ok(Message::Text(text))) => {
                            if let Ok(value) = serde_json::from_str::<Value>(&text) {
                                let _ = events.send((id, ConnEvent::Frame(value)));
                            }
                        }
                        Some(Ok(Message::Close(frame))) => {
                            let _ = socket.flush().await;
                            let _ = events.send((id, ConnEvent::Closed(frame.map(|f| u16::from(f.code)))));
                            return;
                        }
                        Some(Ok(_)) => {}
                        Some(Err(_)) | None => break,
                    },
                }
            }
            let _ = events.send((id, ConnEvent::Closed(None)));
        });
        ConnHandle { commands }
    }
}
