//! The registry of live connections: ids, handles, keepalive and the
//! fleet-wide operations (close everything, count).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use switchyard_protocol::close::CloseReason;
use switchyard_protocol::CloseCode;
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::broker::Subscriber;
use crate::outbox::{Outbox, OutboxLimits, Outgoing};

/// Which route a connection came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `/ws`: the topic protocol.
    Topics,
    /// `/echo`: diagnostic echo.
    Echo,
}

/// What the rest of the gateway holds of one connection: its id, its outbox
/// and when it was last heard from. The connection's task owns the socket.
#[derive(Debug)]
pub struct ConnHandle {
    /// Numeric id, unique within this process.
    pub id: u64,
    /// Correlation id shown to the client in `welcome` and in every log line.
    pub label: String,
    /// The route.
    pub route: Route,
    /// Outgoing frames.
    pub outbox: Outbox,
    /// What a drain has done to this connection.
    pub drain_mark: DrainMark,
    /// The session's subject (`None`: anonymous), for revocation.
    pub subject: Option<String>,
    /// Milliseconds since the hub started when a frame last arrived.
    last_seen_ms: AtomicU64,
}

impl Subscriber for ConnHandle {
    fn id(&self) -> u64 {
        self.id
    }

    fn outbox(&self) -> &Outbox {
        &self.outbox
    }
}

/// What a drain has done to one connection, and which drain: the drain's
/// generation in the high bits, a state in the low byte (the states are the
/// drain engine's to define). It lives with the connection so that the hub
/// does not depend on the drain engine.
#[derive(Debug, Default)]
pub struct DrainMark(AtomicU64);

impl DrainMark {
    /// Marks the connection with `state` for drain `generation`.
    pub(crate) fn set(&self, generation: u64, state: u8) {
        self.0
            .store(generation << 8 | u64::from(state), Ordering::Relaxed);
    }

    /// (generation, state); (0, 0) for a connection no drain planned.
    pub(crate) fn get(&self) -> (u64, u8) {
        let raw = self.0.load(Ordering::Relaxed);
        (raw >> 8, (raw & 0xff) as u8)
    }
}

/// The limits a new connection is admitted under.
#[derive(Debug, Clone, Copy)]
pub struct AdmitLimits {
    /// Connections on the gateway.
    pub max: usize,
    /// Connections of one subject; 0 for no limit.
    pub per_subject: usize,
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdmitRefused {
    /// The gateway holds its maximum.
    AtCapacity,
    /// The subject holds its maximum.
    SubjectLimit,
}

/// What one keepalive sweep did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SweepReport {
    /// Connections sent a ping (and a heartbeat on `/ws`).
    pub pinged: usize,
    /// Silent connections aborted.
    pub reaped: usize,
}

/// All live connections of this gateway.
pub struct Hub {
    connections: Mutex<HashMap<u64, Arc<ConnHandle>>>,
    /// Open connections per subject (only subjects with some), kept with
    /// `connections` (taken after its lock) for the per-subject limit.
    per_subject: Mutex<HashMap<String, usize>>,
    next_id: AtomicU64,
    started: Instant,
    server_id: String,
    limits: OutboxLimits,
    emptied: Notify,
    heartbeat: Utf8Bytes,
}

impl Hub {
    /// An empty hub for the gateway `server_id`.
    pub fn new(server_id: String, limits: OutboxLimits) -> Self {
        Hub {
            connections: Mutex::new(HashMap::new()),
            per_subject: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            started: Instant::now(),
            server_id,
            limits,
            emptied: Notify::new(),
            heartbeat: Utf8Bytes::from(switchyard_protocol::ServerFrame::Heartbeat.to_json()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Arc<ConnHandle>>> {
        self.connections.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn new_handle(&self, route: Route, subject: Option<String>) -> Arc<ConnHandle> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        Arc::new(ConnHandle {
            id,
            label: format!("{}-{id}", self.server_id),
            route,
            outbox: Outbox::new(self.limits),
            drain_mark: Default::default(),
            subject,
            last_seen_ms: AtomicU64::new(self.now_ms()),
        })
    }

    /// Registers a new anonymous connection and returns its handle.
    #[cfg(test)]
    pub fn register(&self, route: Route) -> Arc<ConnHandle> {
        let handle = self.new_handle(route, None);
        self.lock().insert(handle.id, handle.clone());
        handle
    }

    /// Registers a new connection of `subject` unless `limits` refuse it:
    /// `max` connections on the gateway, or `per_subject` of one subject
    /// (0: no limit). Checked and counted under one lock, so both limits are
    /// exact.
    pub fn admit(
        &self,
        route: Route,
        subject: Option<String>,
        limits: AdmitLimits,
    ) -> Result<Arc<ConnHandle>, AdmitRefused> {
        let mut map = self.lock();
        if map.len() >= limits.max {
            return Err(AdmitRefused::AtCapacity);
        }
        let mut per_subject = self.per_subject.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(subject) = &subject {
            let open = per_subject.get(subject).copied().unwrap_or(0);
            if limits.per_subject > 0 && open >= limits.per_subject {
                return Err(AdmitRefused::SubjectLimit);
            }
            *per_subject.entry(subject.clone()).or_insert(0) += 1;
        }
        let handle = self.new_handle(route, subject);
        map.insert(handle.id, handle.clone());
        Ok(handle)
    }

    /// The connection `id`, if it is open.
    pub fn get(&self, id: u64) -> Option<Arc<ConnHandle>> {
        self.lock().get(&id).cloned()
    }

    /// Asks every connection of `subject` to close with `code`; returns how many.
    pub fn close_subject(&self, subject: &str, code: CloseCode, reason: &str) -> usize {
        let reason = CloseReason::text(reason).to_json();
        let mut closed = 0;
        for handle in self.snapshot() {
            if handle.subject.as_deref() == Some(subject) {
                handle.outbox.close(code, reason.clone());
                closed += 1;
            }
        }
        closed
    }

    /// Removes a connection that has ended.
    pub fn remove(&self, id: u64) {
        let mut map = self.lock();
        let removed = map.remove(&id);
        if let Some(subject) = removed.as_ref().and_then(|h| h.subject.as_ref()) {
            let mut per_subject = self.per_subject.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(open) = per_subject.get_mut(subject) {
                *open -= 1;
                if *open == 0 {
                    per_subject.remove(subject);
                }
            }
        }
        if map.is_empty() {
            self.emptied.notify_waiters();
        }
    }

    /// Records that a frame arrived on `handle`.
    pub fn touch(&self, handle: &ConnHandle) {
        handle.last_seen_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// Open connections.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no connection is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Handles of every open connection.
    pub fn snapshot(&self) -> Vec<Arc<ConnHandle>> {
        self.lock().values().cloned().collect()
    }

    /// Asks every connection to close with `code`.
    pub fn close_all(&self, code: CloseCode, reason: &str) {
        let reason = CloseReason::text(reason).to_json();
        for handle in self.snapshot() {
            handle.outbox.close(code, reason.clone());
        }
    }

    /// Aborts every connection that is still open.
    pub fn abort_all(&self) {
        for handle in self.snapshot() {
            handle.outbox.abort();
        }
    }

    /// Waits until no connection is open, or `timeout` passes. Returns whether it emptied.
    pub async fn wait_empty(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let emptied = self.emptied.notified();
            if self.is_empty() {
                return true;
            }
            if tokio::time::timeout_at(deadline, emptied).await.is_err() {
                return self.is_empty();
            }
        }
    }

    /// One keepalive pass: aborts connections silent for longer than
    /// `silence_limit`; when `ping` is set, queues a protocol ping (and a
    /// `heartbeat` frame on `/ws`) on the others.
    pub fn sweep(&self, silence_limit: Duration, ping: bool) -> SweepReport {
        let now = self.now_ms();
        let limit = silence_limit.as_millis() as u64;
        let mut report = SweepReport::default();
        for handle in self.snapshot() {
            let silent = now.saturating_sub(handle.last_seen_ms.load(Ordering::Relaxed));
            if silent > limit {
                tracing::info!(conn = %handle.label, silent_ms = silent, "reaping silent connection");
                handle.outbox.abort();
                report.reaped += 1;
            } else if ping {
                // A full queue turns into a 4002 close inside push; nothing else to do.
                let _ = handle.outbox.push(Outgoing::Ping);
                if handle.route == Route::Topics {
                    let _ = handle.outbox.push(Outgoing::Text(self.heartbeat.clone()));
                }
                report.pinged += 1;
            }
        }
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::EndRequest;

    fn hub() -> Hub {
        Hub::new(
            "test".into(),
            OutboxLimits {
                max_messages: 10,
                max_bytes: 1000,
            },
        )
    }

    #[tokio::test]
    async fn sweep_pings_live_and_reaps_silent() {
        let hub = hub();
        let quiet = hub.register(Route::Topics);
        let echo = hub.register(Route::Echo);
        assert_eq!(quiet.label, format!("test-{}", quiet.id));
        let report = hub.sweep(Duration::from_secs(60), true);
        assert_eq!(
            report,
            SweepReport {
                pinged: 2,
                reaped: 0
            }
        );
        assert_eq!(quiet.outbox.queued(), 2, "ping + heartbeat");
        assert_eq!(echo.outbox.queued(), 1, "echo gets no heartbeat frame");

        tokio::time::sleep(Duration::from_millis(30)).await;
        hub.touch(&echo);
        let report = hub.sweep(Duration::from_millis(20), false);
        assert_eq!(
            report,
            SweepReport {
                pinged: 0,
                reaped: 1
            }
        );
        assert_eq!(quiet.outbox.end_request(), Some(EndRequest::Abort));
        assert_eq!(echo.outbox.end_request(), None);
    }

    #[tokio::test]
    async fn wait_empty_resolves_on_last_removal() {
        let hub = Arc::new(hub());
        let a = hub.register(Route::Topics);
        assert!(!hub.wait_empty(Duration::from_millis(10)).await);
        let remover = {
            let hub = hub.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                hub.remove(a.id);
            })
        };
        assert!(hub.wait_empty(Duration::from_secs(5)).await);
        remover.await.expect("join");
    }

    #[test]
    fn admit_is_bounded_and_close_subject_picks_the_subject() {
        let hub = hub();
        let limits = AdmitLimits {
            max: 3,
            per_subject: 2,
        };
        let alice = hub
            .admit(Route::Topics, Some("alice".into()), limits)
            .expect("room");
        let alice2 = hub
            .admit(Route::Topics, Some("alice".into()), limits)
            .expect("room");
        assert_eq!(
            hub.admit(Route::Topics, Some("alice".into()), limits).err(),
            Some(AdmitRefused::SubjectLimit),
            "alice's third"
        );
        let bob = hub
            .admit(Route::Topics, Some("bob".into()), limits)
            .expect("room");
        assert_eq!(
            hub.admit(Route::Topics, None, limits).err(),
            Some(AdmitRefused::AtCapacity)
        );
        assert_eq!(
            hub.close_subject("alice", CloseCode::SessionRevoked, "revoked"),
            2
        );
        for handle in [&alice, &alice2] {
            assert!(matches!(
                handle.outbox.end_request(),
                Some(EndRequest::Close {
                    code: CloseCode::SessionRevoked,
                    ..
                })
            ));
        }
        assert_eq!(bob.outbox.end_request(), None);
        hub.remove(bob.id);
        assert!(hub.get(bob.id).is_none());
        assert!(hub.admit(Route::Topics, None, limits).is_ok(), "room again");
        hub.remove(alice.id);
        assert!(
            hub.admit(Route::Topics, Some("alice".into()), limits)
                .is_ok(),
            "alice has room again once one of hers ended"
        );
    }
}
