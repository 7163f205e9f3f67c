//! `Client`: a session that outlives its connections.
//!
//! A background task owns the current [`Connection`] and keeps the session
//! going: it reconnects with full-jitter backoff (or after the gateway's
//! `retry_ms`), resubscribes every topic from the last position delivered,
//! migrates make-before-break when the gateway says `migrate` (new connection
//! first, resume, then close the old one with 1000), drops duplicates by
//! (epoch, offset), and holds publishes in a bounded outbox while
//! disconnected. The application reads one continuous stream of
//! [`ClientEvent`]s.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use serde_json::value::RawValue;
use switchyard_protocol::close::{CloseReason, ABNORMAL_CLOSURE};
use switchyard_protocol::{CloseClass, ErrorCode, Position, ServerFrame};
use tokio::sync::{mpsc, Notify};

use crate::policy::{decide, AfterClose, Backoff, Cursor, Phase, Waits};
use crate::{ClientError, Closed, Connection, Credential, Event};

/// Settings of a [`Client`].
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// `ws://host:port/ws` (in Kubernetes: the Service).
    pub url: String,
    /// Reconnect backoff.
    pub backoff: Backoff,
    /// Most publishes held while disconnected.
    pub outbox_limit: usize,
    /// Time allowed to open a connection.
    pub connect_timeout: Duration,
    /// Where credentials come from; asked before every connection, so a
    /// ticket is fresh and a token refreshed after 4001.
    pub credentials: Option<CredentialSource>,
    /// How long a connection must stay up for the backoff to start over: a
    /// gateway that accepts and drops at once gets ever longer waits.
    pub healthy: Duration,
}

/// Produces the credential for the next connection.
#[derive(Clone)]
pub struct CredentialSource(
    Arc<dyn Fn() -> BoxFuture<'static, Result<Credential, String>> + Send + Sync>,
);

impl CredentialSource {
    /// A source calling `fetch` (e.g. an HTTP call to the application
    /// backend that mints a ticket or refreshes a token).
    pub fn new<F>(fetch: F) -> Self
    where
        F: Fn() -> BoxFuture<'static, Result<Credential, String>> + Send + Sync + 'static,
    {
        CredentialSource(Arc::new(fetch))
    }

    /// The same credential every time (a long-lived bearer token).
    pub fn fixed(credential: Credential) -> Self {
        CredentialSource::new(move || {
            let credential = credential.clone();
            Box::pin(async move { Ok(credential) })
        })
    }

    async fn fetch(&self) -> Result<Credential, ClientError> {
        (self.0)().await.map_err(ClientError::Credential)
    }
}

impl std::fmt::Debug for CredentialSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CredentialSource")
    }
}

impl ClientOptions {
    /// Defaults: backoff 100 ms doubling to 10 s (started over after a
    /// connection stayed up 10 s; the first wait after an abnormal close
    /// over 2 s), 1,000 queued publishes, 10 s to connect.
    pub fn new(url: impl Into<String>) -> Self {
        ClientOptions {
            url: url.into(),
            backoff: Backoff {
                base: Duration::from_millis(100),
                cap: Duration::from_secs(10),
                abnormal_window: Duration::from_secs(2),
            },
            outbox_limit: 1000,
            connect_timeout: Duration::from_secs(10),
            credentials: None,
            healthy: Duration::from_secs(10),
        }
    }
}

/// What the application sees.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientEvent {
    /// A connection is up (first connect or a reconnect).
    Connected {
        /// The connection's correlation id.
        connection_id: String,
        /// The gateway.
        server_id: String,
    },
    /// The connection closed; the session reconnects after `retry_in` unless
    /// the code is terminal (then [`ClientEvent::Stopped`] follows).
    Disconnected {
        /// Close code (1006 without a close frame).
        code: u16,
        /// What the code means.
        class: CloseClass,
        /// When the next attempt happens.
        retry_in: Duration,
    },
    /// The session moved to another gateway without a gap in connectivity.
    Migrated {
        /// The gateway left.
        from: String,
        /// The gateway joined.
        to: String,
    },
    /// A subscription is active (again); `recovered` false means history was
    /// lost: resynchronise the topic's state.
    Resumed {
        /// The topic.
        topic: String,
        /// Whether nothing was missed.
        recovered: bool,
    },
    /// A message, each (epoch, offset) once and in order.
    Message {
        /// The topic.
        topic: String,
        /// Its position.
        position: Position,
        /// Its data.
        data: serde_json::Value,
    },
    /// A publish of ours was accepted.
    Published {
        /// The topic.
        topic: String,
        /// Where it landed.
        position: Position,
    },
    /// The gateway reported an error for a request.
    Error {
        /// The kind.
        code: ErrorCode,
        /// The explanation.
        message: String,
    },
    /// The session has ended (terminal close code, or [`Client::close`]).
    Stopped {
        /// The close code that ended it.
        code: u16,
    },
}

/// Counters of a session.
#[derive(Debug, Default)]
pub struct ClientStats {
    /// Connections opened (including migrations).
    pub connections: AtomicU64,
    /// Make-before-break migrations completed.
    pub migrations: AtomicU64,
    /// Messages dropped as duplicates.
    pub duplicates_dropped: AtomicU64,
}

/// Why a publish was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    /// The outbox holds `outbox_limit` publishes already.
    #[error("the client outbox is full")]
    OutboxFull,
    /// The session has ended ([`ClientEvent::Stopped`]).
    #[error("the session has stopped")]
    Stopped,
}

enum Command {
    Subscribe(String),
    Unsubscribe(String),
    Close,
}

struct Shared {
    outbox: Mutex<VecDeque<(String, Box<RawValue>)>>,
    outbox_wake: Notify,
    stats: ClientStats,
    stopped: AtomicBool,
}

/// A session with a gateway; see the module documentation.
pub struct Client {
    commands: mpsc::UnboundedSender<Command>,
    events: mpsc::Receiver<ClientEvent>,
    shared: Arc<Shared>,
    outbox_limit: usize,
}

impl Client {
    /// Starts the session; it connects in the background.
    pub fn start(options: ClientOptions) -> Client {
        let (commands, requests) = mpsc::unbounded_channel();
        let (events, received) = mpsc::channel(1024);
        let shared = Arc::new(Shared {
            outbox: Mutex::new(VecDeque::new()),
            outbox_wake: Notify::new(),
            stats: ClientStats::default(),
            stopped: AtomicBool::new(false),
        });
        let outbox_limit = options.outbox_limit;
        let driver = Driver {
            options,
            topics: BTreeMap::new(),
            events,
            requests,
            shared: shared.clone(),
        };
        tokio::spawn(driver.run());
        Client {
            commands,
            events: received,
            shared,
            outbox_limit,
        }
    }

    /// Subscribes to `topic` (kept across reconnects and migrations).
    pub fn subscribe(&self, topic: &str) {
        let _ = self.commands.send(Command::Subscribe(topic.to_owned()));
    }

    /// Unsubscribes from `topic`.
    pub fn unsubscribe(&self, topic: &str) {
        let _ = self.commands.send(Command::Unsubscribe(topic.to_owned()));
    }

    /// Publishes `data` (JSON) on `topic`; held while disconnected. At
    /// most once: a publish written to a connection that then drops may be
    /// lost ([`ClientEvent::Published`] confirms one).
    pub fn publish(&self, topic: &str, data: Box<RawValue>) -> Result<(), PublishError> {
        if self.shared.stopped.load(Ordering::Acquire) {
            return Err(PublishError::Stopped);
        }
        let mut outbox = self.shared.outbox.lock().unwrap_or_else(|e| e.into_inner());
        if outbox.len() >= self.outbox_limit {
            return Err(PublishError::OutboxFull);
        }
        outbox.push_back((topic.to_owned(), data));
        drop(outbox);
        self.shared.outbox_wake.notify_one();
        Ok(())
    }

    /// Ends the session (close 1000).
    pub fn close(&self) {
        let _ = self.commands.send(Command::Close);
    }

    /// The next event; `None` after the session has stopped and every event was read.
    pub async fn next_event(&mut self) -> Option<ClientEvent> {
        self.events.recv().await
    }

    /// The session's counters.
    pub fn stats(&self) -> &ClientStats {
        &self.shared.stats
    }
}

/// How a connection's service ended.
enum End {
    Closed(Closed),
    Stopped,
}

struct Driver {
    options: ClientOptions,
    topics: BTreeMap<String, Cursor>,
    events: mpsc::Sender<ClientEvent>,
    requests: mpsc::UnboundedReceiver<Command>,
    shared: Arc<Shared>,
}

impl Driver {
    async fn run(mut self) {
        let mut attempt: u32 = 0;
        loop {
            let (closed, up_since, phase) = match self.open().await {
                Ok(mut connection) => {
                    let since = tokio::time::Instant::now();
                    match self.serve(&mut connection).await {
                        End::Stopped => return self.stop(1000).await,
                        End::Closed(closed) => (closed, Some(since), Phase::Open),
                    }
                }
                // A refusal before `welcome` is acted on like any close.
                Err(err) => (refusal(&err), None, Phase::Connecting),
            };
            // The backoff starts over only after a connection that stayed up.
            if up_since.is_some_and(|since| since.elapsed() >= self.options.healthy) {
                attempt = 0;
            }
            let waits = self.options.backoff.waits(attempt, rand::random());
            attempt = attempt.saturating_add(1);
            let (delay, class) = match decide(closed.code, phase, closed.reason.retry_ms, waits) {
                AfterClose::Reconnect(delay) => (delay, CloseClass::Reconnect),
                AfterClose::Reauthenticate(delay) => (delay, CloseClass::Reauthenticate),
                // (TakeOver and Stay are decisions of a migration's overlap.)
                AfterClose::Stop | AfterClose::TakeOver | AfterClose::Stay => {
                    return self.stop(closed.code).await
                }
            };
            self.emit(ClientEvent::Disconnected {
                code: closed.code,
                class,
                retry_in: delay,
            })
            .await;
            if self.pause(delay).await.is_err() {
                return self.stop(1000).await;
            }
        }
    }

    async fn emit(&self, event: ClientEvent) {
        let _ = self.events.send(event).await;
    }

    async fn stop(self, code: u16) {
        self.shared.stopped.store(true, Ordering::Release);
        self.emit(ClientEvent::Stopped { code }).await;
    }

    /// Waits `delay` while still taking commands; `Err` when asked to close.
    async fn pause(&mut self, delay: Duration) -> Result<(), ()> {
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = &mut sleep => return Ok(()),
                request = self.requests.recv() => match request {
                    None | Some(Command::Close) => return Err(()),
                    Some(Command::Subscribe(topic)) => { self.topics.entry(topic).or_default(); }
                    Some(Command::Unsubscribe(topic)) => { self.topics.remove(&topic); }
                },
            }
        }
    }

    /// Connects and resubscribes every topic from its cursor.
    async fn open(&mut self) -> Result<Connection, ClientError> {
        let dial = dial(self.options.url.clone(), self.options.credentials.clone());
        let mut connection = tokio::time::timeout(self.options.connect_timeout, dial)
            .await
            .map_err(|_| ClientError::Closed {
                code: ABNORMAL_CLOSURE,
                class: CloseClass::Reconnect,
                retry_ms: None,
            })??;
        self.shared
            .stats
            .connections
            .fetch_add(1, Ordering::Relaxed);
        for (topic, cursor) in &self.topics {
            connection.subscribe(topic, cursor.position()).await?;
        }
        let welcome = connection.welcome().clone();
        self.emit(ClientEvent::Connected {
            connection_id: welcome.connection_id,
            server_id: welcome.server_id,
        })
        .await;
        Ok(connection)
    }

    async fn flush_outbox(&self, connection: &mut Connection) -> Result<(), ClientError> {
        loop {
            let next = self
                .shared
                .outbox
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pop_front();
            let Some((topic, data)) = next else {
                return Ok(());
            };
            connection
                .send(&switchyard_protocol::ClientFrame::Publish { topic, data })
                .await?;
        }
    }

    /// Serves one connection until it closes, migrating when told to.
    async fn serve(&mut self, connection: &mut Connection) -> End {
        // Topics whose subscribe the gateway refused as `unavailable` (its
        // backplane reconnecting): asked again after a short random wait.
        let mut retry: BTreeSet<String> = BTreeSet::new();
        let retry_wait = tokio::time::sleep(Duration::from_secs(3600));
        tokio::pin!(retry_wait);
        // Publishes held while disconnected go out first; later ones wake the
        // loop through `outbox_wake` (its permit is kept while we are busy).
        // A send error needs no handling here: the close arrives via next_event.
        let _ = self.flush_outbox(connection).await;
        loop {
            tokio::select! {
                request = self.requests.recv() => match request {
                    None | Some(Command::Close) => {
                        let _ = connection.close(1000).await;
                        return End::Stopped;
                    }
                    Some(Command::Subscribe(topic)) => {
                        let since = self.topics.entry(topic.clone()).or_default().position();
                        let _ = connection.subscribe(&topic, since).await;
                    }
                    Some(Command::Unsubscribe(topic)) => {
                        self.topics.remove(&topic);
                        let _ = connection.unsubscribe(&topic).await;
                    }
                },
                _ = self.shared.outbox_wake.notified() => {
                    let _ = self.flush_outbox(connection).await;
                }
                _ = &mut retry_wait, if !retry.is_empty() => {
                    for topic in std::mem::take(&mut retry) {
                        if let Some(cursor) = self.topics.get(&topic) {
                            let _ = connection.subscribe(&topic, cursor.position()).await;
                        }
                    }
                }
                event = connection.next_event() => match event {
                    Ok(Event::Closed(closed)) => return End::Closed(closed),
                    Err(_) => return End::Closed(Closed { code: ABNORMAL_CLOSURE, reason: Default::default() }),
                    Ok(Event::Frame(ServerFrame::Migrate { grace_ms })) => {
                        match self.migrate(connection, Duration::from_millis(grace_ms)).await {
                            Migration::Done(unconfirmed) => {
                                retry.extend(unconfirmed);
                                retry_wait.as_mut().reset(tokio::time::Instant::now() + retry_delay());
                            }
                            Migration::Stayed => {}
                            Migration::Ended(closed) => return End::Closed(closed),
                        }
                    }
                    Ok(Event::Frame(frame)) => {
                        if let Some(topic) = self.on_frame(frame).await {
                            if retry.is_empty() {
                                retry_wait.as_mut().reset(tokio::time::Instant::now() + retry_delay());
                            }
                            retry.insert(topic);
                        }
                    }
                },
            }
        }
    }

    /// Delivers a frame to the application, dropping duplicates. Returns a
    /// topic whose subscribe was refused as `unavailable`, to ask again.
    async fn on_frame(&mut self, frame: ServerFrame) -> Option<String> {
        let event = match frame {
            ServerFrame::Message {
                topic,
                epoch,
                offset,
                data,
            } => {
                let position = Position::new(epoch, offset);
                let cursor = self.topics.get_mut(&topic)?;
                if !cursor.accept(position) {
                    self.shared
                        .stats
                        .duplicates_dropped
                        .fetch_add(1, Ordering::Relaxed);
                    return None;
                }
                ClientEvent::Message {
                    topic,
                    position,
                    data,
                }
            }
            ServerFrame::Subscribed {
                topic,
                position,
                recovered,
            } => {
                self.topics.get_mut(&topic)?.subscribed(position, recovered);
                ClientEvent::Resumed { topic, recovered }
            }
            ServerFrame::Published { topic, position } => {
                ClientEvent::Published { topic, position }
            }
            ServerFrame::Error {
                code: ErrorCode::Unavailable,
                topic: Some(topic),
                ..
            } if self.topics.contains_key(&topic) => return Some(topic),
            ServerFrame::Error { code, message, .. } => ClientEvent::Error { code, message },
            _ => return None,
        };
        self.emit(event).await;
        None
    }

    /// Make-before-break: open the new connection (reading the old one
    /// meanwhile: left unread, its outbox at the gateway would fill and
    /// close it with 4002), resume every topic on it while the old one keeps
    /// delivering (the cursors drop the overlap; a topic the new side
    /// resynchronised is no longer taken from the old one), then close the
    /// old one with 1000. Bounded by the grace: when it runs out, or the old
    /// connection closes first, the session moves to the new connection
    /// anyway and the topics not yet resumed are returned, to be asked
    /// again. If the new connection cannot be opened, the session stays on
    /// the old one; its 4000 close then takes the ordinary reconnect path. A
    /// terminal close on either side ends the session.
    async fn migrate(&mut self, old: &mut Connection, grace: Duration) -> Migration {
        let deadline = tokio::time::Instant::now() + grace;
        let from = old.welcome().server_id.clone();
        let dialled = dial(self.options.url.clone(), self.options.credentials.clone());
        tokio::pin!(dialled);
        let mut new = loop {
            tokio::select! {
                opened = &mut dialled => match opened {
                    Ok(new) => break new,
                    Err(err) => {
                        let refused = refusal(&err);
                        return match decide(refused.code, Phase::OverlapNew, refused.reason.retry_ms, Waits::default()) {
                            AfterClose::Stay => Migration::Stayed,
                            _ => {
                                let _ = old.close(1000).await;
                                Migration::Ended(refused)
                            }
                        };
                    }
                },
                event = old.next_event() => match event {
                    Ok(Event::Frame(frame)) => {
                        let _ = self.on_frame(frame).await;
                    }
                    Ok(Event::Closed(closed)) => return Migration::Ended(closed),
                    Err(_) => return Migration::Ended(abnormal()),
                },
                _ = tokio::time::sleep_until(deadline) => return Migration::Stayed,
            }
        };
        self.shared
            .stats
            .connections
            .fetch_add(1, Ordering::Relaxed);
        let mut waiting: BTreeSet<String> = self.topics.keys().cloned().collect();
        let mut resynced: BTreeSet<String> = BTreeSet::new();
        for (topic, cursor) in &self.topics {
            if new.subscribe(topic, cursor.position()).await.is_err() {
                return Migration::Stayed;
            }
        }
        let mut old_open = true;
        while !waiting.is_empty() && old_open {
            tokio::select! {
                event = old.next_event() => match event {
                    Ok(Event::Frame(ServerFrame::Message { topic, .. })) if resynced.contains(&topic) => {
                        self.shared.stats.duplicates_dropped.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Event::Frame(frame)) => {
                        let _ = self.on_frame(frame).await;
                    }
                    Ok(Event::Closed(closed)) => match decide(closed.code, Phase::OverlapOld, closed.reason.retry_ms, Waits::default()) {
                        AfterClose::TakeOver => old_open = false,
                        _ => {
                            let _ = new.close(1000).await;
                            return Migration::Ended(closed);
                        }
                    },
                    Err(_) => old_open = false,
                },
                event = new.next_event() => match event {
                    Ok(Event::Frame(frame)) => {
                        if let ServerFrame::Subscribed { topic, recovered, .. } = &frame {
                            waiting.remove(topic);
                            if !recovered {
                                resynced.insert(topic.clone());
                            }
                        }
                        if let Some(topic) = self.on_frame(frame).await {
                            // Refused for now: ask the new gateway again shortly.
                            tokio::time::sleep(retry_delay()).await;
                            let since = self.topics.get(&topic).and_then(|c| c.position());
                            let _ = new.subscribe(&topic, since).await;
                        }
                    }
                    Ok(Event::Closed(closed)) => match decide(closed.code, Phase::OverlapNew, closed.reason.retry_ms, Waits::default()) {
                        // The new connection failed: carry on with the old one.
                        AfterClose::Stay => return Migration::Stayed,
                        _ => {
                            let _ = old.close(1000).await;
                            return Migration::Ended(closed);
                        }
                    },
                    Err(_) => return Migration::Stayed,
                },
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        let to = new.welcome().server_id.clone();
        std::mem::swap(old, &mut new);
        if old_open {
            new.retire(1000, RETIRE_TIMEOUT);
        }
        self.shared.stats.migrations.fetch_add(1, Ordering::Relaxed);
        self.emit(ClientEvent::Migrated { from, to }).await;
        Migration::Done(waiting)
    }
}

/// How long a migration's old connection is read after its 1000 close for
/// the gateway's close frame.
const RETIRE_TIMEOUT: Duration = Duration::from_secs(2);

/// How a migration ended.
enum Migration {
    /// On the new connection; these topics are still to be confirmed.
    Done(BTreeSet<String>),
    /// Still on the old connection.
    Stayed,
    /// The session's connection closed (the old one, or a terminal close of
    /// either side): handled like any close.
    Ended(Closed),
}

/// Fetches a credential (if there is a source) and connects. Owns what it
/// needs, so a migration can read the old connection while it runs.
async fn dial(
    url: String,
    credentials: Option<CredentialSource>,
) -> Result<Connection, ClientError> {
    let credential = match &credentials {
        Some(source) => Some(source.fetch().await?),
        None => None,
    };
    Connection::connect_with(&url, credential.as_ref()).await
}

fn abnormal() -> Closed {
    Closed {
        code: ABNORMAL_CLOSURE,
        reason: CloseReason::default(),
    }
}

/// A connection attempt that failed, as a close: the gateway's close before
/// `welcome` with its code and hint; anything else (refused, timed out, no
/// credential) as 1006.
fn refusal(err: &ClientError) -> Closed {
    match err {
        ClientError::Closed { code, retry_ms, .. } => Closed {
            code: *code,
            reason: CloseReason {
                retry_ms: *retry_ms,
                ..CloseReason::default()
            },
        },
        _ => abnormal(),
    }
}

/// A random 100–600 ms wait before asking a refused subscribe again.
fn retry_delay() -> Duration {
    Duration::from_millis(100 + rand::random::<u64>() % 500)
}
