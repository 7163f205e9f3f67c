//! The drain engine: moves this gateway's connections elsewhere, gradually.
//!
//! The schedule is [`switchyard_protocol::drain::slot_times`] (pure); this
//! module applies it. One task per drain walks three clocks — the next slot,
//! the oldest `migrate` grace running out, the deadline — so a drain of 50,000
//! connections costs one timer, not 50,000.
//!
//! Each drain has a generation, and each connection it plans carries a
//! [`DrainMark`](crate::hub::DrainMark) of that generation, so that when a connection ends it is
//! counted once, by the drain that planned it, by how it left: by itself
//! after `migrate` (`client`), closed at its slot or after the grace
//! (`slot`), at the deadline (`deadline`), or for any other reason (`other`:
//! a 4002, a reaped peer, a 4001/4503, a client that left before its slot).
//! A drain that runs to its end (not cancelled) therefore reports
//! `migrated_by_client + closed_at_slot + forced_at_deadline +
//! ended_otherwise = total`; the migration tests check it.
//!
//! A drain ends only after its forced closes are done (bounded by the close
//! timeout), so its final counts, log line and span include them. Once it
//! has ended the gateway stays drained — readiness 503, new upgrades
//! refused with 4000 — until `DELETE /admin/drain` or a new drain.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
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

use crate::hub::{ConnHandle, Hub};
use crate::metrics::{Initiator, Metrics};
use crate::outbox::Outgoing;
use crate::security::ratelimit::TokenBucket;

// 0 (the default): never planned by any drain.
const SCHEDULED: u8 = 1;
const MIGRATE_SENT: u8 = 2;
const CLOSED_AT_SLOT: u8 = 3;
const CLOSED_AT_DEADLINE: u8 = 4;

/// How a planned connection left, as its drain counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// One of the three ways a drain moves a connection.
    Moved(MigrationKind),
    /// Ended for another reason (its own close code says which).
    Other,
}

impl Outcome {
    /// The `how` label of `switchyard_migrations_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Moved(kind) => kind.as_str(),
            Outcome::Other => "other",
        }
    }
}

// A drain's life: running, then finished (it stays drained) or cancelled.
const RUNNING: u8 = 0;
const FINISHED: u8 = 1;
const CANCELLED: u8 = 2;

/// One drain: its request, its plan's counters, its state.
pub struct Drain {
    generation: u64,
    request: DrainRequest,
    grace: Duration,
    close_timeout: Duration,
    started: Instant,
    /// Milliseconds from `started`; only ever lowered (SIGTERM caps it).
    deadline_ms: AtomicU64,
    total: u64,
    schedule_ms: u64,
    /// Planned connections that have not ended yet.
    unended: AtomicU64,
    migrated_by_client: AtomicU64,
    closed_at_slot: AtomicU64,
    forced_at_deadline: AtomicU64,
    ended_otherwise: AtomicU64,
    signals_sent: AtomicU64,
    state: AtomicU8,
    /// Wakes the drain task: a cancel, a lowered deadline, the last planned
    /// connection gone.
    wake: Notify,
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
    /// SIGTERM: the shutdown drain runs to the stop time and cannot be
    /// replaced or cancelled.
    #[error("the gateway is shutting down; its drain cannot be started again or cancelled")]
    ShuttingDown,
    /// The request's numbers are unusable.
    #[error(transparent)]
    Invalid(#[from] switchyard_protocol::drain::DrainError),
}

impl DrainRefused {
    /// The `error` field of the admin API's answer.
    pub fn code(&self) -> &'static str {
        match self {
            DrainRefused::AlreadyDraining => "already_draining",
            DrainRefused::NotDraining => "not_draining",
            DrainRefused::ShuttingDown => "shutting_down",
            DrainRefused::Invalid(_) => "bad_request",
        }
    }
}

impl Drain {
    /// Whether the drain still runs.
    pub fn is_active(&self) -> bool {
        self.state.load(Ordering::Relaxed) == RUNNING
    }

    /// Whether the drain keeps the gateway drained (readiness 503, new
    /// upgrades refused): while it runs, and after it finished, until it is
    /// cancelled.
    pub fn holds(&self) -> bool {
        self.state.load(Ordering::Relaxed) != CANCELLED
    }

    fn is_cancelled(&self) -> bool {
        self.state.load(Ordering::Relaxed) == CANCELLED
    }

    /// Planned connections that have not ended yet.
    pub fn unended(&self) -> u64 {
        self.unended.load(Ordering::Relaxed)
    }

    /// Whether `handle` is in this drain's plan.
    pub fn plans(&self, handle: &ConnHandle) -> bool {
        handle.drain_mark.get().0 == self.generation
    }

    /// Progress, with `remaining` = connections still open on the gateway.
    pub fn status(&self, remaining: u64) -> DrainStatus {
        DrainStatus {
            active: self.is_active(),
            cancelled: self.is_cancelled(),
            mode: self.request.mode,
            total: self.total,
            remaining,
            migrated_by_client: self.migrated_by_client.load(Ordering::Relaxed),
            closed_at_slot: self.closed_at_slot.load(Ordering::Relaxed),
            forced_at_deadline: self.forced_at_deadline.load(Ordering::Relaxed),
            ended_otherwise: self.ended_otherwise.load(Ordering::Relaxed),
            signals_sent: self.signals_sent.load(Ordering::Relaxed),
            elapsed_ms: self.started.elapsed().as_millis() as u64,
            schedule_ms: self.schedule_ms,
            deadline_ms: self.deadline_ms.load(Ordering::Relaxed),
        }
    }

    /// The deadline, as an instant.
    pub fn deadline(&self) -> Instant {
        self.started + Duration::from_millis(self.deadline_ms.load(Ordering::Relaxed))
    }

    /// Sets `switchyard_drain_deadline_timestamp_seconds` to the deadline as
    /// unix time.
    fn export_deadline(&self, metrics: &Metrics) {
        let left = self.deadline().saturating_duration_since(Instant::now());
        let at = std::time::SystemTime::now() + left;
        let secs = at
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        metrics.drain_deadline.set(secs as i64);
    }

    /// Brings the deadline forward to `at` if it is later (SIGTERM bounds a
    /// running drain by its stop time). Never moves it back.
    pub fn cap_deadline(&self, at: Instant) {
        let ms = at.saturating_duration_since(self.started).as_millis() as u64;
        if self.deadline_ms.fetch_min(ms, Ordering::Relaxed) > ms {
            self.wake.notify_one();
        }
    }

    /// Counts a connection that has ended, if this drain planned it; returns
    /// how it is counted. `initiator` says who closed it: only a client's
    /// own close after `migrate` counts as a migration by the client.
    pub fn connection_ended(&self, handle: &ConnHandle, initiator: Initiator) -> Option<Outcome> {
        let (generation, state) = handle.drain_mark.get();
        if generation != self.generation || state == 0 {
            return None;
        }
        if self.unended.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.wake.notify_one();
        }
        let outcome = outcome(state, initiator, self.is_cancelled())?;
        let counter = match outcome {
            Outcome::Moved(MigrationKind::Client) => &self.migrated_by_client,
            Outcome::Moved(MigrationKind::Slot) => &self.closed_at_slot,
            Outcome::Moved(MigrationKind::Deadline) => &self.forced_at_deadline,
            Outcome::Other => &self.ended_otherwise,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        Some(outcome)
    }

    /// Counts a signal sent at a slot: a `migrate` frame, or a 4000 close
    /// (at the slot, or once a migrate's grace ran out).
    fn signal_sent(&self, metrics: &Metrics, signal: &'static str) {
        self.signals_sent.fetch_add(1, Ordering::Relaxed);
        metrics.drain_signals.with_label_values(&[signal]).inc();
    }

    fn retry_reason(&self) -> String {
        CloseReason {
            retry_ms: Some(jitter(self.request.retry_jitter_ms)),
            reason: None,
        }
        .to_json()
    }
}

/// How a planned connection in `state` that ended by `initiator`'s doing
/// is counted, if at all.
fn outcome(state: u8, initiator: Initiator, cancelled: bool) -> Option<Outcome> {
    Some(match state {
        CLOSED_AT_SLOT => Outcome::Moved(MigrationKind::Slot),
        CLOSED_AT_DEADLINE => Outcome::Moved(MigrationKind::Deadline),
        MIGRATE_SENT if initiator == Initiator::Client => Outcome::Moved(MigrationKind::Client),
        // Left untouched by a cancelled drain: not its doing, not its count.
        SCHEDULED if cancelled => return None,
        // Sent `migrate` but reset or closed by the gateway (4002, reaped,
        // revoked), or gone before its signal.
        SCHEDULED | MIGRATE_SENT => Outcome::Other,
        _ => return None,
    })
}

/// A random wait in [0, `max_ms`].
pub fn jitter(max_ms: u64) -> u64 {
    rand::rng().random_range(0..=max_ms)
}

/// What the drain engine needs of the gateway it drains (the gateway
/// implements it; the engine does not depend on the gateway).
pub trait DrainHost: Send + Sync + 'static {
    /// The live connections.
    fn hub(&self) -> &Hub;
    /// The metrics the drain reports.
    fn metrics(&self) -> &Metrics;
    /// The drain state.
    fn drains(&self) -> &Drains;
    /// The `migrate` grace when a request names none.
    fn default_migrate_grace(&self) -> Duration;
    /// How long a closed connection's peer has to answer the close.
    fn close_timeout(&self) -> Duration;
}

/// A gateway's drain state: the current or last drain, whether the process
/// is shutting down, and who waits for a drain to end. Readiness follows
/// from it: 503 while a drain holds the gateway or it shuts down.
#[derive(Default)]
pub struct Drains {
    slot: Mutex<Option<Arc<Drain>>>,
    shutting_down: AtomicBool,
    /// Notified when a drain ends (finished or cancelled).
    pub finished: Notify,
}

impl Drains {
    /// The current or last drain.
    pub fn current(&self) -> Option<Arc<Drain>> {
        self.slot().clone()
    }

    fn slot(&self) -> MutexGuard<'_, Option<Arc<Drain>>> {
        self.slot.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether SIGTERM (or SIGINT) has been received.
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Relaxed)
    }

    /// Marks the process as shutting down.
    pub(crate) fn set_shutting_down(&self, metrics: &Metrics) {
        self.shutting_down.store(true, Ordering::Relaxed);
        self.refresh(metrics);
    }

    /// Whether the gateway refuses new work (readiness is 503): a drain runs
    /// or has drained it (until cancelled), or the process shuts down.
    pub fn is_draining(&self) -> bool {
        self.is_shutting_down() || self.slot().as_ref().is_some_and(|d| d.holds())
    }

    /// Re-derives the `switchyard_draining` gauge from the state.
    pub fn refresh(&self, metrics: &Metrics) {
        metrics.draining.set(i64::from(self.is_draining()));
    }

    /// Why a new connection is refused now, if it is: the process shuts
    /// down, or a drain holds the gateway. `admitted` is a connection that
    /// has already joined the hub: it stays if the drain planned it (it
    /// joined just before the drain took its snapshot).
    pub fn refusal(&self, admitted: Option<&ConnHandle>) -> Option<&'static str> {
        let drain = self.current();
        if let (Some(drain), Some(handle)) = (&drain, admitted) {
            if drain.plans(handle) {
                return None;
            }
        }
        if self.is_shutting_down() {
            Some("shutting_down")
        } else if drain.is_some_and(|d| d.holds()) {
            Some("draining")
        } else {
            None
        }
    }

    /// Counts a connection that ended, for the drain that planned it (if
    /// any); `initiator` says who closed it.
    pub fn connection_ended(&self, handle: &ConnHandle, initiator: Initiator, metrics: &Metrics) {
        let Some(drain) = self.current() else {
            return;
        };
        if let Some(outcome) = drain.connection_ended(handle, initiator) {
            metrics
                .migrations
                .with_label_values(&[outcome.as_str()])
                .inc();
            if drain.is_active() {
                metrics.drain_remaining.set(drain.unended() as i64);
            }
        }
    }
}

static GENERATIONS: AtomicU64 = AtomicU64::new(1);

/// Starts a drain of every connection the gateway holds now (`POST
/// /admin/drain`). Refused while one runs or while the gateway shuts down.
pub fn start<H: DrainHost>(
    host: &Arc<H>,
    request: DrainRequest,
) -> Result<Arc<Drain>, DrainRefused> {
    if host.drains().is_shutting_down() {
        return Err(DrainRefused::ShuttingDown);
    }
    begin(host, request)
}

/// Starts the drain SIGTERM asks for (the caller has set the gateway
/// shutting down, which [`start`] refuses).
pub(crate) fn start_for_shutdown<H: DrainHost>(
    host: &Arc<H>,
    request: DrainRequest,
) -> Result<Arc<Drain>, DrainRefused> {
    begin(host, request)
}

fn begin<H: DrainHost>(host: &Arc<H>, request: DrainRequest) -> Result<Arc<Drain>, DrainRefused> {
    request.validate()?;
    // The slot stays locked while the plan is taken and marked: a handshake
    // admitted meanwhile looks at the slot after joining the hub, so it
    // either is in the snapshot (and marked) or sees this drain and is
    // refused (`Drains::refusal`).
    let mut current = host.drains().slot();
    if current.as_ref().is_some_and(|d| d.is_active()) {
        return Err(DrainRefused::AlreadyDraining);
    }
    let generation = GENERATIONS.fetch_add(1, Ordering::Relaxed);
    let mut connections = host.hub().snapshot();
    connections.shuffle(&mut rand::rng());
    for handle in &connections {
        handle.drain_mark.set(generation, SCHEDULED);
    }
    let slots = slot_times(
        connections.len(),
        request.window_ms,
        request.max_rate,
        request.deadline_ms,
    );
    let grace = request
        .migrate_grace_ms
        .map_or(host.default_migrate_grace(), Duration::from_millis);
    let drain = Arc::new(Drain {
        generation,
        request,
        grace,
        close_timeout: host.close_timeout(),
        started: Instant::now(),
        deadline_ms: AtomicU64::new(request.deadline_ms),
        total: connections.len() as u64,
        schedule_ms: slots.last().copied().unwrap_or(0),
        unended: AtomicU64::new(connections.len() as u64),
        migrated_by_client: AtomicU64::new(0),
        closed_at_slot: AtomicU64::new(0),
        forced_at_deadline: AtomicU64::new(0),
        ended_otherwise: AtomicU64::new(0),
        signals_sent: AtomicU64::new(0),
        state: AtomicU8::new(RUNNING),
        wake: Notify::new(),
    });
    *current = Some(drain.clone());
    drop(current);
    let metrics = host.metrics();
    host.drains().refresh(metrics);
    metrics.drain_active.set(1);
    metrics.drain_remaining.set(drain.total as i64);
    metrics.drain_total.set(drain.total as i64);
    metrics.drain_max_rate.set(request.max_rate as i64);
    drain.export_deadline(metrics);
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
        ended_otherwise = tracing::field::Empty,
        cancelled = tracing::field::Empty
    );
    tokio::spawn(run(host.clone(), drain.clone(), plan).instrument(span));
    Ok(drain)
}

/// Cancels the running drain (rollback: no more closes), or lifts a
/// finished one; either way readiness returns. Refused during shutdown.
pub fn cancel<H: DrainHost>(host: &H) -> Result<Arc<Drain>, DrainRefused> {
    let drains = host.drains();
    if drains.is_shutting_down() {
        return Err(DrainRefused::ShuttingDown);
    }
    let drain = drains.current().ok_or(DrainRefused::NotDraining)?;
    let cancelled = [RUNNING, FINISHED].into_iter().any(|from| {
        drain
            .state
            .compare_exchange(from, CANCELLED, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    });
    if !cancelled {
        return Err(DrainRefused::NotDraining);
    }
    drain.wake.notify_one();
    drains.refresh(host.metrics());
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

/// The pace at which a drain's signals leave. Every signal — a slot's
/// `migrate` or 4000, and the 4000 after a migrate's grace — takes a place
/// in one window of `max_rate` per second: that is the promise, and what
/// `signals_sent` counts. Slots also take a token from a bucket at the
/// schedule's own pace (`rate` per second, `rate / 10` deep): a drain task
/// that wakes late (a saturated core) finds a backlog of due slots, and the
/// second alone would let it out as one burst wherever the window has room,
/// so a window a little longer than a second could hold nearly two seconds'
/// worth. The bucket lets the backlog out as fast as the rate refills it.
/// Only the deadline's forced closes are outside the cap.
#[derive(Debug)]
pub struct ReleasePace {
    second: RateWindow,
    smooth: TokenBucket,
}

impl ReleasePace {
    /// Slots at `rate` per second in bursts of at most `rate / 10` (rounded
    /// up); every signal under `cap` per second.
    pub fn new(rate: u64, cap: u64, now: Instant) -> Self {
        let rate_per_s = u32::try_from(rate).unwrap_or(u32::MAX);
        ReleasePace {
            second: RateWindow::new(cap, Duration::from_secs(1)),
            smooth: TokenBucket::new(rate_per_s, rate_per_s.div_ceil(10), now.into_std()),
        }
    }

    /// Takes one slot's place at `now`, if the second and the bucket have room.
    pub fn try_take(&mut self, now: Instant) -> bool {
        if self.next_free(now) > now {
            return false;
        }
        self.second.try_take(now) && self.smooth.try_take(now.into_std())
    }

    /// When the second and the bucket next have room for a slot (`now` if they do).
    pub fn next_free(&mut self, now: Instant) -> Instant {
        let token = Instant::from_std(self.smooth.next_token(now.into_std()));
        self.second.next_free(now).max(token)
    }

    /// Takes one place in the second for a signal outside the schedule (the
    /// close after a migrate's grace), if it has room.
    pub fn try_take_unpaced(&mut self, now: Instant) -> bool {
        self.second.try_take(now)
    }

    /// When the second next has room (`now` if it does).
    pub fn next_free_unpaced(&mut self, now: Instant) -> Instant {
        self.second.next_free(now)
    }
}

/// The drain task.
async fn run<H: DrainHost>(host: Arc<H>, drain: Arc<Drain>, plan: Vec<(Arc<ConnHandle>, u64)>) {
    let mut slots = plan.into_iter().peekable();
    let mut graces: VecDeque<(Instant, Arc<ConnHandle>)> = VecDeque::new();
    // Slots whose time has come, waiting for room under the cap.
    let mut due: VecDeque<Arc<ConnHandle>> = VecDeque::new();
    let migrate = Utf8Bytes::from(
        ServerFrame::Migrate {
            grace_ms: drain.grace.as_millis() as u64,
        }
        .to_json(),
    );
    // Late slots leave at the schedule's own pace (N/W, at most R).
    let pace = paced_rate(
        drain.total as usize,
        drain.request.window_ms,
        drain.request.max_rate,
    );
    let mut cap = ReleasePace::new(pace, drain.request.max_rate, Instant::now());
    let metrics = host.metrics();
    let forced = loop {
        let now = Instant::now();
        let deadline = drain.deadline();
        let next_slot = if due.is_empty() {
            slots
                .peek()
                .map(|(_, at)| drain.started + Duration::from_millis(*at))
        } else {
            Some(cap.next_free(now))
        };
        // An overdue grace waits for room in the second.
        let next_grace = graces
            .front()
            .map(|(at, _)| (*at).max(cap.next_free_unpaced(now)));
        let wake = [next_slot, next_grace, Some(deadline)]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(deadline);
        let woken = drain.wake.notified();
        if drain.unended.load(Ordering::Relaxed) > 0 {
            tokio::select! {
                _ = tokio::time::sleep_until(wake) => {}
                _ = woken => {}
            }
        }
        if drain.is_cancelled() {
            break false;
        }
        let now = Instant::now();
        metrics
            .drain_remaining
            .set(drain.unended.load(Ordering::Relaxed) as i64);
        // SIGTERM may have brought the deadline forward.
        drain.export_deadline(metrics);
        if now >= drain.deadline() {
            force_remaining(host.hub(), metrics, &drain);
            break true;
        }
        while let Some((handle, _)) =
            slots.next_if(|(_, at)| drain.started + Duration::from_millis(*at) <= now)
        {
            due.push_back(handle);
        }
        // Graces first: their signal is owed since the migrate went out.
        while let Some((at, handle)) = graces.front() {
            if *at > now {
                break;
            }
            if handle.outbox.end_request().is_none() {
                if !cap.try_take_unpaced(now) {
                    break;
                }
                close(metrics, handle, &drain, CLOSED_AT_SLOT);
            }
            graces.pop_front();
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
                DrainMode::Close => close(metrics, &handle, &drain, CLOSED_AT_SLOT),
                DrainMode::MakeBeforeBreak => {
                    handle.drain_mark.set(drain.generation, MIGRATE_SENT);
                    let _ = handle.outbox.push(Outgoing::Text(migrate.clone()));
                    drain.signal_sent(metrics, "migrate");
                    graces.push_back((now + drain.grace, handle));
                }
            }
        }
        if drain.unended.load(Ordering::Relaxed) == 0 {
            break false;
        }
    };
    if forced {
        // The forced closes end within the connections' close timeout; the
        // counts are final once they have.
        let done = drain.deadline() + drain.close_timeout;
        while drain.unended.load(Ordering::Relaxed) > 0 && !drain.is_cancelled() {
            let woken = drain.wake.notified();
            if tokio::time::timeout_at(done, woken).await.is_err() {
                break;
            }
        }
    }
    let _ = drain
        .state
        .compare_exchange(RUNNING, FINISHED, Ordering::Relaxed, Ordering::Relaxed);
    metrics.drain_active.set(0);
    metrics.drain_remaining.set(0);
    metrics.drain_total.set(0);
    metrics.drain_max_rate.set(0);
    metrics.drain_deadline.set(0);
    host.drains().refresh(metrics);
    let status = drain.status(host.hub().len() as u64);
    tracing::info!(
        cancelled = status.cancelled,
        total = status.total,
        remaining = status.remaining,
        migrated_by_client = status.migrated_by_client,
        closed_at_slot = status.closed_at_slot,
        forced_at_deadline = status.forced_at_deadline,
        ended_otherwise = status.ended_otherwise,
        elapsed_ms = status.elapsed_ms,
        "drain finished"
    );
    let span = tracing::Span::current();
    span.record("migrated_by_client", status.migrated_by_client);
    span.record("closed_at_slot", status.closed_at_slot);
    span.record("forced_at_deadline", status.forced_at_deadline);
    span.record("ended_otherwise", status.ended_otherwise);
    span.record("cancelled", status.cancelled);
    host.drains().finished.notify_waiters();
}

fn close(metrics: &Metrics, handle: &ConnHandle, drain: &Drain, mark: u8) {
    if mark == CLOSED_AT_SLOT {
        drain.signal_sent(metrics, "close");
    }
    handle.drain_mark.set(drain.generation, mark);
    handle
        .outbox
        .close(CloseCode::Migrate, drain.retry_reason());
}

/// At the deadline: whatever the plan still has open is closed. (New
/// connections are refused while a drain holds the gateway, so the plan is
/// everything.)
fn force_remaining(hub: &Hub, metrics: &Metrics, drain: &Drain) {
    let left: Vec<_> = hub
        .snapshot()
        .into_iter()
        .filter(|handle| drain.plans(handle) && handle.outbox.end_request().is_none())
        .collect();
    tracing::info!(left = left.len(), "drain deadline: closing what is left");
    for handle in left {
        close(metrics, &handle, drain, CLOSED_AT_DEADLINE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::DrainMark;

    #[test]
    fn outcome_table() {
        use Initiator::{Abrupt, Client, Server};
        use MigrationKind::{Client as Moved, Deadline, Slot};
        // (state, who ended it, drain cancelled) -> how it counts
        let table = [
            (CLOSED_AT_SLOT, Client, false, Some(Outcome::Moved(Slot))),
            (CLOSED_AT_SLOT, Abrupt, true, Some(Outcome::Moved(Slot))),
            (
                CLOSED_AT_DEADLINE,
                Server,
                false,
                Some(Outcome::Moved(Deadline)),
            ),
            (MIGRATE_SENT, Client, false, Some(Outcome::Moved(Moved))),
            // told to migrate before a cancel, and did
            (MIGRATE_SENT, Client, true, Some(Outcome::Moved(Moved))),
            // a 4002 or a reaped peer after migrate did not migrate
            (MIGRATE_SENT, Server, false, Some(Outcome::Other)),
            (MIGRATE_SENT, Abrupt, false, Some(Outcome::Other)),
            // gone before its slot: counted, but not as moved
            (SCHEDULED, Client, false, Some(Outcome::Other)),
            (SCHEDULED, Server, false, Some(Outcome::Other)),
            // a cancelled drain does not count what it never touched
            (SCHEDULED, Client, true, None),
            (0, Client, false, None),
        ];
        for (state, initiator, cancelled, expected) in table {
            assert_eq!(
                outcome(state, initiator, cancelled),
                expected,
                "state {state}, {initiator:?}, cancelled {cancelled}"
            );
        }
    }

    #[test]
    fn marks_of_another_generation_are_not_this_drains() {
        let mark = DrainMark::default();
        assert_eq!(mark.get(), (0, 0));
        mark.set(7, MIGRATE_SENT);
        assert_eq!(mark.get(), (7, MIGRATE_SENT));
        mark.set(8, SCHEDULED);
        assert_eq!(
            mark.get(),
            (8, SCHEDULED),
            "a new drain's plan replaces the old mark"
        );
        mark.set(u64::MAX >> 8, CLOSED_AT_DEADLINE);
        assert_eq!(mark.get(), (u64::MAX >> 8, CLOSED_AT_DEADLINE));
    }

    #[test]
    fn grace_closes_share_the_second_with_the_slots() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        // Slots paced at 50/s under a cap of 50/s.
        let mut pace = ReleasePace::new(50, 50, start);
        let mut taken = 0;
        for ms in (0..1_000).step_by(20) {
            taken += usize::from(pace.try_take(at(ms)));
        }
        assert!(
            (45..=50).contains(&taken),
            "{taken} slots in the first second"
        );
        // A grace close in the same second waits for room in it.
        let room = 50 - taken;
        let graces = (0..60).filter(|_| pace.try_take_unpaced(at(999))).count();
        assert_eq!(graces, room, "grace closes fill only what the slots left");
        assert!(pace.next_free_unpaced(at(999)) > at(999));
        assert!(
            pace.try_take_unpaced(at(1_000)),
            "room again as the second moves on"
        );
    }

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
        let mut pace = ReleasePace::new(700, 700, start);
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
