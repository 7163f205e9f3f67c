//! Admission control for the public listener: a bound on handshakes in
//! flight and on the rate of accepted connections, for every client
//! together. A crashed pod's clients all lose their connection at the same
//! instant and come back to the survivors at once; beyond the bounds the
//! gateway answers cheaply and says when to come back, over a window that
//! grows with the overload, so the retries arrive at about the rate the
//! gateway accepts (`crash_storm` in tests/tests/crash.rs measures it at the
//! survivors; bench/crash.sh compares it with no admission control).
//!
//! The decision is a plain function of the time, the handshakes in flight
//! and a uniform draw ([`ShedState::decide`]); [`Shedder`] wraps it with a
//! lock and an RAII count of handshakes in flight.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::ratelimit::TokenBucket;

/// The bounds (`websocket.max_handshakes_in_flight`, `websocket.handshake_rate`,
/// `websocket.handshake_burst`); 0 turns a bound off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShedLimits {
    /// Most connections between the TCP accept and the answer to their
    /// first request (TLS handshake, head, credentials, resume).
    pub max_in_flight: usize,
    /// Connections accepted per second.
    pub rate: u32,
    /// Connections accepted at once on top of the rate.
    pub burst: u32,
}

/// Why a connection was shed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShedWhy {
    /// `max_in_flight` handshakes were already under way.
    InFlight,
    /// The accept rate's bucket was empty.
    Rate,
}

/// A connection turned away: when to come back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shed {
    /// Which bound it hit.
    pub why: ShedWhy,
    /// The client's wait before it tries again.
    pub retry_ms: u64,
}

/// The least wait a shed client is told: under a burst of sheds the window
/// grows from here.
pub const MIN_RETRY_WINDOW_MS: u64 = 1_000;
/// The longest window: a minute of spread is enough for any crowd the
/// gateway's connection limit admits.
pub const MAX_RETRY_WINDOW_MS: u64 = 60_000;
/// Every retry waits at least this long: coming back at once meets the same
/// overload.
pub const MIN_RETRY_MS: u64 = 100;

/// The shed decisions' state: the accept-rate bucket and the recent sheds
/// (a count decaying by e every second, about the sheds of the last second).
#[derive(Debug, Clone)]
pub struct ShedState {
    limits: ShedLimits,
    bucket: Option<TokenBucket>,
    pressure: f64,
    updated: Instant,
}

impl ShedState {
    /// A state with a full bucket.
    pub fn new(limits: ShedLimits, now: Instant) -> Self {
        ShedState {
            limits,
            bucket: (limits.rate > 0).then(|| TokenBucket::new(limits.rate, limits.burst, now)),
            pressure: 0.0,
            updated: now,
        }
    }

    /// Whether a connection accepted at `now` may be served (one token of
    /// the accept rate); `unit` is uniform in [0, 1) and places its retry
    /// in the window. Charged at the TCP accept, before any TLS work.
    pub fn accept(&mut self, now: Instant, unit: f64) -> Result<(), Shed> {
        self.decay(now);
        if self.bucket.as_mut().is_some_and(|b| !b.try_take(now)) {
            return Err(self.shed(ShedWhy::Rate, unit));
        }
        Ok(())
    }

    /// Whether a handshake whose request head arrived at `now`, with
    /// `in_flight` others being judged (credentials, tickets), may be
    /// judged too. Counted from the head, not the TCP accept: a client that
    /// sends nothing holds no slot (slowloris is the head timeout's job).
    pub fn begin(&mut self, now: Instant, in_flight: usize, unit: f64) -> Result<(), Shed> {
        self.decay(now);
        if self.limits.max_in_flight > 0 && in_flight >= self.limits.max_in_flight {
            return Err(self.shed(ShedWhy::InFlight, unit));
        }
        Ok(())
    }

    fn decay(&mut self, now: Instant) {
        self.pressure = self.pressure_at(now);
        self.updated = now;
    }

    /// The recent sheds as they will have decayed by `now`.
    fn pressure_at(&self, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.pressure * (-elapsed).exp()
    }

    /// Sheds one connection: its retry falls in a window that is the time
    /// the gateway needs, at its rate, to accept the connections it shed in
    /// the last second (at least [`MIN_RETRY_WINDOW_MS`]). Clients spread
    /// over it return at about the rate, so a storm becomes a queue the
    /// gateway drains at its own pace instead of a series of waves. Without
    /// a rate bound the window grows at `max_in_flight` per second.
    fn shed(&mut self, why: ShedWhy, unit: f64) -> Shed {
        self.pressure += 1.0;
        let window = self.window(self.pressure);
        let retry_ms = MIN_RETRY_MS + (window * unit.clamp(0.0, 1.0)) as u64;
        Shed { why, retry_ms }
    }

    /// The window (ms) over which `pressure` recent sheds are spread.
    fn window(&self, pressure: f64) -> f64 {
        let per_second = match (self.limits.rate, self.limits.max_in_flight) {
            (0, 0) => 1.0,
            (0, in_flight) => in_flight as f64,
            (rate, _) => f64::from(rate),
        };
        (pressure / per_second * 1_000.0)
            .clamp(MIN_RETRY_WINDOW_MS as f64, MAX_RETRY_WINDOW_MS as f64)
    }

    /// The window a connection shed now would be spread over (ms), for
    /// `/admin/status`.
    pub fn window_ms(&self, now: Instant) -> u64 {
        self.window(self.pressure_at(now)) as u64
    }
}

/// Admission control shared by the accept loop: the state behind a lock
/// (one short critical section per accepted connection) and the count of
/// handshakes in flight.
pub struct Shedder {
    state: Mutex<ShedState>,
    in_flight: Arc<AtomicUsize>,
}

/// A handshake in flight: counted until dropped (its first request is
/// answered, or the connection ends before that).
#[derive(Debug)]
pub struct HandshakeSlot {
    in_flight: Arc<AtomicUsize>,
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Shedder {
    /// A shedder with these bounds.
    pub fn new(limits: ShedLimits) -> Self {
        Shedder {
            state: Mutex::new(ShedState::new(limits, Instant::now())),
            in_flight: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Charges a connection just accepted to the accept rate, or says when
    /// it should come back.
    pub fn accept(&self) -> Result<(), Shed> {
        self.lock().accept(Instant::now(), rand::random::<f64>())
    }

    /// Begins judging a handshake whose head arrived (counted until the slot
    /// is dropped), or says when it should come back.
    pub fn begin(&self) -> Result<HandshakeSlot, Shed> {
        let in_flight = self.in_flight.load(Ordering::Acquire);
        let decided = self
            .lock()
            .begin(Instant::now(), in_flight, rand::random::<f64>());
        decided?;
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        Ok(HandshakeSlot {
            in_flight: self.in_flight.clone(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ShedState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What `/admin/status` shows of admission control now, given the
    /// connections shed so far (counted where they are answered: a probe
    /// that found the bucket empty is served all the same).
    pub fn status(&self, shed_total: u64) -> switchyard_protocol::admin::AdmissionStatus {
        let state = self.lock();
        switchyard_protocol::admin::AdmissionStatus {
            handshakes_in_flight: self.in_flight.load(Ordering::Acquire) as u64,
            max_handshakes_in_flight: state.limits.max_in_flight as u64,
            handshake_rate: u64::from(state.limits.rate),
            handshake_burst: u64::from(state.limits.burst),
            shed_total,
            retry_window_ms: state.window_ms(Instant::now()),
        }
    }
}

/// How long a shed client is asked to wait, in whole seconds for
/// `Retry-After` (rounded up: a client must not come back early).
pub fn retry_after_secs(retry_ms: u64) -> u64 {
    Duration::from_millis(retry_ms).as_secs() + u64::from(!retry_ms.is_multiple_of(1_000))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_in_flight: usize, rate: u32, burst: u32) -> ShedLimits {
        ShedLimits {
            max_in_flight,
            rate,
            burst,
        }
    }

    #[test]
    fn the_burst_then_the_rate_are_accepted_and_the_rest_shed() {
        let t0 = Instant::now();
        let mut state = ShedState::new(limits(0, 10, 5), t0);
        let ms = |n| t0 + Duration::from_millis(n);
        let accepted = (0..20).filter(|_| state.accept(t0, 0.5).is_ok()).count();
        assert_eq!(accepted, 5, "the burst");
        // One token per 100 ms afterwards.
        assert!(state.accept(ms(50), 0.5).is_err());
        assert!(state.accept(ms(100), 0.5).is_ok());
        assert_eq!(
            state.accept(ms(100), 0.5).map_err(|s| s.why),
            Err(ShedWhy::Rate)
        );
        // Both bounds off: everything is accepted and begun.
        let mut open = ShedState::new(limits(0, 0, 0), t0);
        assert!((0..10_000).all(|n| open.accept(t0, 0.0).is_ok() && open.begin(t0, n, 0.0).is_ok()));
    }

    #[test]
    fn the_in_flight_bound_sheds_handshakes_not_accepts() {
        let t0 = Instant::now();
        let mut state = ShedState::new(limits(3, 0, 0), t0);
        assert!(state.begin(t0, 2, 0.0).is_ok());
        assert_eq!(
            state.begin(t0, 3, 0.0).map_err(|s| s.why),
            Err(ShedWhy::InFlight)
        );
        assert!(state.accept(t0, 0.0).is_ok(), "no rate bound");
    }

    /// The retry window is the time the rate needs for the last second's
    /// sheds: 10,000 connections at once against 1,000/s spread their
    /// retries over ~9 s (not 1 s, which would shed 8,000 again), and it
    /// shrinks back once the storm has passed.
    #[test]
    fn the_retry_window_grows_with_the_sheds_and_decays() {
        let t0 = Instant::now();
        let mut state = ShedState::new(limits(0, 1_000, 1_000), t0);
        let mut last = None;
        for _ in 0..10_000 {
            if let Err(shed) = state.accept(t0, 1.0) {
                last = Some(shed.retry_ms);
            }
        }
        assert_eq!(last, Some(MIN_RETRY_MS + 9_000), "9,000 shed at 1,000/s");
        assert_eq!(state.window_ms(t0), 9_000);
        // The first sheds get the minimum window; a draw of 0 waits the minimum.
        let mut fresh = ShedState::new(limits(0, 1_000, 1), t0);
        assert!(fresh.accept(t0, 1.0).is_ok(), "the burst of one");
        assert_eq!(
            fresh.accept(t0, 1.0),
            Err(Shed {
                why: ShedWhy::Rate,
                retry_ms: MIN_RETRY_MS + MIN_RETRY_WINDOW_MS
            })
        );
        assert_eq!(
            fresh.accept(t0, 0.0).map_err(|s| s.retry_ms),
            Err(MIN_RETRY_MS)
        );
        // Five seconds later the pressure has decayed by e^5.
        assert_eq!(
            state.window_ms(t0 + Duration::from_secs(5)),
            MIN_RETRY_WINDOW_MS
        );
        // Capped at a minute however large the crowd.
        for _ in 0..200_000 {
            let _ = state.accept(t0, 1.0);
        }
        assert_eq!(state.window_ms(t0), MAX_RETRY_WINDOW_MS);
        // Without a rate, the in-flight bound sets the pace.
        let mut in_flight = ShedState::new(limits(100, 0, 0), t0);
        for _ in 0..500 {
            let _ = in_flight.begin(t0, 100, 1.0);
        }
        assert_eq!(in_flight.window_ms(t0), 5_000);
    }

    #[test]
    fn slots_count_handshakes_in_flight_until_dropped() {
        let shedder = Shedder::new(limits(2, 0, 0));
        let a = shedder.begin().expect("first");
        let b = shedder.begin().expect("second");
        let shed = shedder.begin().expect_err("third is shed");
        assert_eq!(shed.why, ShedWhy::InFlight);
        assert!((MIN_RETRY_MS..=MIN_RETRY_MS + MIN_RETRY_WINDOW_MS).contains(&shed.retry_ms));
        assert_eq!(shedder.status(0).handshakes_in_flight, 2);
        drop(a);
        let c = shedder.begin().expect("a slot was freed");
        drop((b, c));
        assert_eq!(shedder.status(0).handshakes_in_flight, 0);
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        for (ms, secs) in [
            (0, 0),
            (1, 1),
            (999, 1),
            (1_000, 1),
            (1_001, 2),
            (9_100, 10),
        ] {
            assert_eq!(retry_after_secs(ms), secs, "{ms} ms");
        }
    }
}
