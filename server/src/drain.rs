//! The drain engine: moves this gateway's connections elsewhere, gradually.
//!
//! The schedule is [`switchyard_protocol::drain::slot_times`] (pure); this
//! module applies it. One task per drain walks three clocks — the next slot,
//! the oldest `migrate` grace running out, the deadline — so a drain of 50,000
//! connections costs one timer, not 50,000.
//!
//! Each connection carries a [`DrainMark`] so that, when it ends, it is
//! counted by how it left: by itself (`client`), closed at its slot (`slot`)
//! or at the deadline (`deadline`).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument;

use rand::seq::SliceRandom;
use rand::Rng;
use switchyard_protocol::close::CloseReason;
use switchyard_protocol::drain::{
    paced_rate, slot_times, DrainMode, DrainRequest, DrainStatus, MigrationKind,
};
use switchyard_protocol::{CloseCode, ServerFrame};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::hub::ConnHandle;
use crate::outbox::Outgoing;
use crate::security::ratelimit::TokenBucket;
use crate::server::Gateway;

/// What a drain has done to one connection.
#[derive(Debug, Default)]
pub struct DrainMark(AtomicU8);

// 0 (the default): untouched.
const MIGRATE_SENT: u8 = 1;
const CLOSED_AT_SLOT: u8 = 2;
const CLOSED_AT_DEADLINE: u8 = 3;

impl DrainMark {
    fn set(&self, value: u8) {
        self.0.store(value, Ordering::Relaxed);
    }

    /// How the connection left, judged when it ends.
    pub fn kind(&self) -> MigrationKind {
        match self.0.load(Ordering::Relaxed) {
            CLOSED_AT_SLOT => MigrationKind::Slot,
            CLOSED_AT_DEADLINE => MigrationKind::Deadline,
            _ => MigrationKind::Client,
        }
    }
}

/// One drain: its request, its counters, its cancel switch.
pub struct Drain {
    request: DrainRequest,
    grace: Duration,
    started: Instant,
    total: u64,
    schedule_ms: u64,
    migrated_by_client: AtomicU64,
    closed_at_slot: AtomicU64,
    forced_at_deadline: AtomicU64,
    signals_sent: AtomicU64,
    cancelled: AtomicBool,
    finished: AtomicBool,
    cancel: Notify,
}

/// Why a drain request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DrainRefused {
    /// A drain is already running.
    #[error("a drain is already in progress")]
    AlreadyDraining,
    /// Nothing to cancel.
    #[error("no drain in progress")]
    NotDraining,
    /// The request's numbers are unusable.
    #[error(transparent)]
    Invalid(#[from] switchyard_protocol::drain::DrainError),
}

impl Drain {
    /// Whether the drain still runs.
    pub fn is_active(&self) -> bool {
        !self.finished.load(Ordering::Relaxed)
    }

    /// Progress, with `remaining` = connections still open on the gateway.
    pub fn status(&self, remaining: u64) -> DrainStatus {
        DrainStatus {
            active: self.is_active(),
            cancelled: self.cancelled.load(Ordering::Relaxed),
            mode: self.request.mode,
            total: self.total,
            remaining,
            migrated_by_client: self.migrated_by_client.load(Ordering::Relaxed),
            closed_at_slot: self.closed_at_slot.load(Ordering::Relaxed),
            forced_at_deadline: self.forced_at_deadline.load(Ordering::Relaxed),
            signals_sent: self.signals_sent.load(Ordering::Relaxed),
            elapsed_ms: self.started.elapsed().as_millis() as u64,
            schedule_ms: self.schedule_ms,
        }
    }

    /// The deadline, as an instant.
    pub fn deadline(&self) -> Instant {
        self.started + Duration::from_millis(self.request.deadline_ms)
    }

    /// Counts a drained connection that has ended.
    pub fn connection_ended(&self, kind: MigrationKind) {
        let counter = match kind {
            MigrationKind::Client => &self.migrated_by_client,
            MigrationKind::Slot => &self.closed_at_slot,
            MigrationKind::Deadline => &self.forced_at_deadline,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a signal sent at a slot: a `migrate` frame, or a 4000 close
    /// (at the slot, or once a migrate's grace ran out).
    fn signal_sent(&self, gateway: &Gateway, signal: &'static str) {
        self.signals_sent.fetch_add(1, Ordering::Relaxed);
        gateway
            .metrics
            .drain_signals
            .with_label_values(&[signal])
            .inc();
    }

    fn retry_reason(&self) -> String {
        let retry_ms = rand::rng().random_range(0..=self.request.retry_jitter_ms);
        CloseReason {
            retry_ms: Some(retry_ms),
            reason: None,
        }
        .to_json()
    }
}

/// Starts a drain of every connection the gateway holds now.
pub fn start(gateway: &Arc<Gateway>, request: DrainRequest) -> Result<Arc<Drain>, DrainRefused> {
    request.validate()?;
    let mut current = gateway.drain_slot();
    if current.as_ref().is_some_and(|d| d.is_active()) {
        return Err(DrainRefused::AlreadyDraining);
    }
    let mut connections = gateway.hub.snapshot();
    connections.shuffle(&mut rand::rng());
    let slots = slot_times(
        connections.len(),
        request.window_ms,
        request.max_rate,
        request.deadline_ms,
    );
    let grace = Duration::from_millis(
        request
            .migrate_grace_ms
            .unwrap_or(gateway.config.drain.migrate_grace_ms),
    );
    let drain = Arc::new(Drain {
        request,
        grace,
        started: Instant::now(),
        total: connections.len() as u64,
        schedule_ms: slots.last().copied().unwrap_or(0),
        migrated_by_client: AtomicU64::new(0),
        closed_at_slot: AtomicU64::new(0),
        forced_at_deadline: AtomicU64::new(0),
        signals_sent: AtomicU64::new(0),
        cancelled: AtomicBool::new(false),
        finished: AtomicBool::new(false),
        cancel: Notify::new(),
    });
    *current = Some(drain.clone());
    drop(current);
    gateway.refresh_readiness();
    gateway.metrics.drain_active.set(1);
    tracing::info!(
        total = drain.total,
        window_ms = request.window_ms,
        max_rate = request.max_rate,
        deadline_ms = request.deadline_ms,
        mode = ?request.mode,
        "drain started"
    );
    let plan: Vec<(Arc<ConnHandle>, u64)> = connections.into_iter().zip(slots).collect();
    let span = tracing::info_span!(
        "drain",
        total = drain.total,
        mode = ?request.mode,
        window_ms = request.window_ms,
        max_rate = request.max_rate,
        migrated_by_client = tracing::field::Empty,
        closed_at_slot = tracing::field::Empty,
        forced_at_deadline = tracing::field::Empty,
        cancelled = tracing::field::Empty
    );
    tokio::spawn(run(gateway.clone(), drain.clone(), plan).instrument(span));
    Ok(drain)
}

/// Cancels the running drain (rollback): no more closes; readiness returns.
pub fn cancel(gateway: &Gateway) -> Result<Arc<Drain>, DrainRefused> {
    let current = gateway.drain_slot();
    let drain = current
        .as_ref()
        .filter(|d| d.is_active())
        .cloned()
        .ok_or(DrainRefused::NotDraining)?;
    drop(current);
    drain.cancelled.store(true, Ordering::Relaxed);
    drain.cancel.notify_one();
    tracing::info!("drain cancelled");
    Ok(drain)
}

/// At most `max` actions in any sliding window of `width`. The schedule
/// already spaces slots by 1/R, but a drain task that wakes late (a
/// saturated core) would otherwise send every overdue slot at once; this
/// holds the cap at the moment frames leave the gateway.
#[derive(Debug)]
pub struct RateWindow {
    max: usize,
    width: Duration,
    recent: VecDeque<Instant>,
}

impl RateWindow {
    /// A window allowing `max` actions per `width`.
    pub fn new(max: u64, width: Duration) -> Self {
        RateWindow {
            max: max.max(1) as usize,
            width,
            recent: VecDeque::new(),
        }
    }

    fn forget_before(&mut self, now: Instant) {
        while self
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) >= self.width)
        {
            self.recent.pop_front();
        }
    }

    /// Takes one action's place at `now`, if the window has room.
    pub fn try_take(&mut self, now: Instant) -> bool {
        self.forget_before(now);
        if self.recent.len() < self.max {
            self.recent.push_back(now);
            true
        } else {
            false
        }
    }

    /// When the next place frees up (`now` if there is room).
    pub fn next_free(&mut self, now: Instant) -> Instant {
        self.forget_before(now);
        if self.recent.len() < self.max {
            now
        } else {
            self.recent.front().map_or(now, |t| *t + self.width)
        }
    }
}

/// The pace at which a drain's signals leave: at most `rate` in any second
/// (the promise), and no burst above a tenth of that. A drain task that
/// wakes late (a saturated core) finds a backlog of due slots; the second
/// alone would let it out as one burst wherever the window has room, so a
/// window a little longer than a second could hold nearly two seconds'
/// worth. A token bucket (`rate` per second, `rate / 10` deep) lets the
/// backlog out as fast as the rate refills it: a task late by less than
/// 100 ms still keeps the pace, without the burst.
#[derive(Debug)]
pub struct ReleasePace {
    second: RateWindow,
    smooth: TokenBucket,
}

impl ReleasePace {
    /// A pace of at most `rate` per second, in bursts of at most `rate / 10`
    /// (rounded up).
    pub fn new(rate: u64, now: Instant) -> Self {
        let rate_per_s = u32::try_from(rate).unwrap_or(u32::MAX);
        ReleasePace {
            second: RateWindow::new(rate, Duration::from_secs(1)),
            smooth: TokenBucket::new(rate_per_s, rate_per_s.div_ceil(10), now.into_std()),
        }
    }

    /// Takes one signal's place at `now`, if the second and the bucket have room.
    pub fn try_take(&mut self, now: Instant) -> bool {
        if self.next_free(now) > now {
            return false;
        }
        self.second.try_take(now) && self.smooth.try_take(now.into_std())
    }

    /// When both next have room (`now` if they do).
    pub fn next_free(&mut self, now: Instant) -> Instant {
        let token = Instant::from_std(self.smooth.next_token(now.into_std()));
        self.second.next_free(now).max(token)
    }
}

/// The drain task.
async fn run(gateway: Arc<Gateway>, drain: Arc<Drain>, plan: Vec<(Arc<ConnHandle>, u64)>) {
    let mut slots = plan.into_iter().peekable();
    let mut graces: VecDeque<(Instant, Arc<ConnHandle>)> = VecDeque::new();
    // Slots whose time has come, waiting for room under the cap.
    let mut due: VecDeque<Arc<ConnHandle>> = VecDeque::new();
    let deadline = drain.deadline();
    let migrate = Utf8Bytes::from(
        ServerFrame::Migrate {
            grace_ms: drain.grace.as_millis() as u64,
        }
        .to_json(),
    );
    // With nothing scheduled, look every 100 ms whether the last connection has gone.
    let idle_check = Duration::from_millis(100);
    // Late slots leave at the schedule's own pace (N/W, at most R).
    let pace = paced_rate(
        drain.total as usize,
        drain.request.window_ms,
        drain.request.max_rate,
    );
    let mut cap = ReleasePace::new(pace, Instant::now());
    loop {
        let now = Instant::now();
        let next_slot = if due.is_empty() {
            slots
                .peek()
                .map(|(_, at)| drain.started + Duration::from_millis(*at))
        } else {
            Some(cap.next_free(now))
        };
        let next_grace = graces.front().map(|(at, _)| *at);
        let wake = [
            next_slot,
            next_grace,
            Some(deadline),
            Some(now + idle_check),
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(deadline);
        tokio::select! {
            _ = tokio::time::sleep_until(wake) => {}
            _ = drain.cancel.notified() => break,
        }
        if drain.cancelled.load(Ordering::Relaxed) {
            break;
        }
        let now = Instant::now();
        gateway
            .metrics
            .drain_remaining
            .set(gateway.hub.len() as i64);
        if now >= deadline {
            force_remaining(&gateway, &drain);
            break;
        }
        while let Some((handle, _)) =
            slots.next_if(|(_, at)| drain.started + Duration::from_millis(*at) <= now)
        {
            due.push_back(handle);
        }
        // A late wake-up does not release every overdue slot at once: they
        // leave in order as the pace has room.
        while let Some(handle) = due.front() {
            if handle.outbox.end_request().is_some() {
                due.pop_front(); // already leaving
                continue;
            }
            if !cap.try_take(now) {
                break;
            }
            let Some(handle) = due.pop_front() else { break };
            match drain.request.mode {
                DrainMode::Close => close(&gateway, &handle, &drain, CLOSED_AT_SLOT),
                DrainMode::MakeBeforeBreak => {
                    handle.drain_mark.set(MIGRATE_SENT);
                    let _ = handle.outbox.push(Outgoing::Text(migrate.clone()));
                    drain.signal_sent(&gateway, "migrate");
                    graces.push_back((now + drain.grace, handle));
                }
            }
        }
        while let Some((_, handle)) = graces.pop_front_if(|(at, _)| *at <= now) {
            if handle.outbox.end_request().is_none() {
                close(&gateway, &handle, &drain, CLOSED_AT_SLOT);
            }
        }
        if slots.peek().is_none() && due.is_empty() && graces.is_empty() && gateway.hub.is_empty() {
            break;
        }
    }
    drain.finished.store(true, Ordering::Relaxed);
    gateway.metrics.drain_active.set(0);
    gateway
        .metrics
        .drain_remaining
        .set(gateway.hub.len() as i64);
    gateway.refresh_readiness();
    let status = drain.status(gateway.hub.len() as u64);
    tracing::info!(
        cancelled = status.cancelled,
        remaining = status.remaining,
        migrated_by_client = status.migrated_by_client,
        closed_at_slot = status.closed_at_slot,
        forced_at_deadline = status.forced_at_deadline,
        elapsed_ms = status.elapsed_ms,
        "drain finished"
    );
    let span = tracing::Span::current();
    span.record("migrated_by_client", status.migrated_by_client);
    span.record("closed_at_slot", status.closed_at_slot);
    span.record("forced_at_deadline", status.forced_at_deadline);
    span.record("cancelled", status.cancelled);
    gateway.drain_finished.notify_waiters();
}

fn close(gateway: &Gateway, handle: &ConnHandle, drain: &Drain, mark: u8) {
    if mark == CLOSED_AT_SLOT {
        drain.signal_sent(gateway, "close");
    }
    handle.drain_mark.set(mark);
    handle
        .outbox
        .close(CloseCode::Migrate, drain.retry_reason());
}

/// At the deadline: whatever is still open is closed, late arrivals included.
fn force_remaining(gateway: &Gateway, drain: &Drain) {
    let left = gateway.hub.snapshot();
    tracing::info!(left = left.len(), "drain deadline: closing what is left");
    for handle in left {
        if handle.outbox.end_request().is_none() {
            close(gateway, &handle, drain, CLOSED_AT_DEADLINE);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_holds_the_cap_for_late_bursts() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut cap = RateWindow::new(3, Duration::from_secs(1));
        // A late wake-up with five overdue slots: three go, two wait.
        let taken: Vec<bool> = (0..5).map(|_| cap.try_take(at(0))).collect();
        assert_eq!(taken, vec![true, true, true, false, false]);
        assert_eq!(cap.next_free(at(10)), at(1000));
        assert!(!cap.try_take(at(999)));
        assert!(cap.try_take(at(1000)), "room again a second later");
        assert_eq!(cap.next_free(at(1000)), at(1000), "two places left");
        assert!(cap.try_take(at(1500)) && cap.try_take(at(1500)));
        assert!(!cap.try_take(at(1500)));
        assert_eq!(cap.next_free(at(1500)), at(2000));
    }

    #[test]
    fn a_late_backlog_leaves_at_the_rate_in_small_bursts() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut pace = ReleasePace::new(700, start);
        // A task asleep for 600 ms wakes to a backlog: a tenth goes now...
        let offer =
            |pace: &mut ReleasePace, ms: u64| (0..1000).filter(|_| pace.try_take(at(ms))).count();
        assert_eq!(offer(&mut pace, 600), 70);
        // ...and the rest as the rate refills: 7 every 10 ms, 35 after 50 ms.
        assert_eq!(offer(&mut pace, 610), 7);
        let next = pace.next_free(at(610));
        assert!(next > at(611) && next < at(612), "one token takes 1/700 s");
        assert_eq!(offer(&mut pace, 660), 35);
        // Waking every 10 ms after that: 7 each time until the second
        // window is full, never more than 700 in any second, and the pace
        // kept (about 700 a second).
        let mut sent = vec![(600, 70), (610, 7), (660, 35)];
        for ms in (670..3_000).step_by(10) {
            sent.push((ms, offer(&mut pace, ms)));
        }
        for (i, (from, _)) in sent.iter().enumerate() {
            let in_second: usize = sent[i..]
                .iter()
                .take_while(|(ms, _)| *ms < from + 1000)
                .map(|(_, n)| n)
                .sum();
            assert!(in_second <= 700, "{in_second} in the second from {from} ms");
        }
        let total: usize = sent.iter().map(|(_, n)| n).sum();
        assert!((1_700..=1_750).contains(&total), "{total} sent in 2.4 s");
    }
}
