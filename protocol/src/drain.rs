//! Drains: the pure arithmetic of moving a gateway's connections elsewhere.
//!
//! A drain has a window W over which closes are spread evenly, a rate cap R
//! (closes per second for this gateway), a deadline D past which whatever is
//! left is closed at once, and a jitter J for the `retry_ms` each closed
//! client is told to wait. When N/R exceeds W the schedule stretches past W;
//! the cap wins over the window, the deadline wins over both.

use serde::{Deserialize, Serialize};

/// How connections are moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DrainMode {
    /// At its slot a connection is closed with 4000 and `{"retry_ms": n}`.
    Close,
    /// At its slot a connection is sent `migrate`; a client that understands
    /// it connects elsewhere, resumes, then closes this connection itself. One
    /// still here after the grace is closed with 4000.
    MakeBeforeBreak,
}

/// `POST /admin/drain` body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrainRequest {
    /// W: the closes are spread evenly over this many milliseconds.
    pub window_ms: u64,
    /// R: at most this many closes per second.
    pub max_rate: u64,
    /// D: at this many milliseconds from the start, everything left is closed.
    pub deadline_ms: u64,
    /// How connections are moved.
    pub mode: DrainMode,
    /// J: each closed client is told to wait a random `retry_ms` in [0, J].
    #[serde(default)]
    pub retry_jitter_ms: u64,
    /// make_before_break: how long a client has, after `migrate`, to leave by
    /// itself before it is closed with 4000. Default: the gateway's setting.
    #[serde(default)]
    pub migrate_grace_ms: Option<u64>,
}

/// Why a drain request cannot be carried out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DrainError {
    /// `max_rate` is zero.
    #[error("max_rate must be at least 1 close per second")]
    ZeroRate,
    /// `deadline_ms` is zero.
    #[error("deadline_ms must be greater than 0")]
    ZeroDeadline,
}

impl DrainRequest {
    /// Checks the request's numbers.
    pub fn validate(&self) -> Result<(), DrainError> {
        if self.max_rate == 0 {
            return Err(DrainError::ZeroRate);
        }
        if self.deadline_ms == 0 {
            return Err(DrainError::ZeroDeadline);
        }
        Ok(())
    }
}

/// How one drained connection left.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MigrationKind {
    /// Sent `migrate`, the client moved and closed this connection itself.
    Client,
    /// The gateway closed it at its slot (4000).
    Slot,
    /// The gateway closed it at the deadline (4000).
    Deadline,
}

impl MigrationKind {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            MigrationKind::Client => "client",
            MigrationKind::Slot => "slot",
            MigrationKind::Deadline => "deadline",
        }
    }
}

/// Progress of a drain, in `GET /admin/status` and the drain endpoints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainStatus {
    /// Whether the drain is still running (false once finished or cancelled).
    pub active: bool,
    /// Whether it was cancelled.
    pub cancelled: bool,
    /// The mode.
    pub mode: DrainMode,
    /// Connections scheduled when the drain started.
    pub total: u64,
    /// Connections still open on this gateway.
    pub remaining: u64,
    /// Planned connections that were sent `migrate` and then closed by the
    /// client itself (the migration worked).
    pub migrated_by_client: u64,
    /// Planned connections closed with 4000 at their slot (`close` mode) or
    /// once a migrate's grace ran out.
    pub closed_at_slot: u64,
    /// Planned connections closed with 4000 at the deadline.
    pub forced_at_deadline: u64,
    /// Planned connections that ended otherwise: left before their signal,
    /// or closed for another reason (4002, 4001, 4503, reaped, ...), each
    /// also counted under its own close code. A drain that was not
    /// cancelled ends with the four counts adding up to `total`.
    #[serde(default)]
    pub ended_otherwise: u64,
    /// Signals sent at slots so far: `migrate` frames, and 4000 closes (at
    /// the slot, or once a migrate's grace ran out). Their pace is what
    /// `max_rate` caps. Absent from gateways older than this field: 0.
    #[serde(default)]
    pub signals_sent: u64,
    /// Milliseconds since the drain started.
    pub elapsed_ms: u64,
    /// When the last slot falls, in milliseconds from the start (≤ deadline).
    pub schedule_ms: u64,
    /// The deadline in milliseconds from the start: the request's, or
    /// earlier when SIGTERM bounded the drain by the process's stop time.
    #[serde(default)]
    pub deadline_ms: u64,
}

/// The slot times, in milliseconds from the start of the drain, for `n`
/// connections: evenly spaced by `max(W/n, 1000/R)` and centred in their
/// intervals, so no one-second window holds more than R of them; slots past
/// the deadline are moved to the deadline. The caller assigns connections to
/// slots in random order.
pub fn slot_times(n: usize, window_ms: u64, max_rate: u64, deadline_ms: u64) -> Vec<u64> {
    if n == 0 {
        return Vec::new();
    }
    let by_window = window_ms as f64 / n as f64;
    let by_rate = 1000.0 / max_rate.max(1) as f64;
    let spacing = by_window.max(by_rate);
    (0..n)
        .map(|i| {
            let at = ((i as f64 + 0.5) * spacing).floor() as u64;
            at.min(deadline_ms)
        })
        .collect()
}

/// The pace of the schedule in slots per second: `n` spread over the window,
/// never above the cap. A drain that falls behind releases overdue slots at
/// this pace — it stretches its schedule rather than compressing it up to R,
/// which would run it at the cap with no room for any client's jitter.
pub fn paced_rate(n: usize, window_ms: u64, max_rate: u64) -> u64 {
    let by_window = (n as u64 * 1000).div_ceil(window_ms.max(1));
    by_window.clamp(1, max_rate.max(1))
}

/// The most slots in any window of `width_ms` (an upper bound over all
/// window positions: a window starting at each slot).
pub fn max_in_window(slots: &[u64], width_ms: u64) -> usize {
    let mut sorted = slots.to_vec();
    sorted.sort_unstable();
    let mut best = 0;
    let mut end = 0;
    for start in 0..sorted.len() {
        while end < sorted.len() && sorted[end] < sorted[start] + width_ms {
            end += 1;
        }
        best = best.max(end - start);
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_table() {
        // (n, W, R, D) → (first slot, last slot, max per second)
        let table: [(usize, u64, u64, u64, u64, u64, usize); 6] = [
            // the window governs: 10 over 1 s, 100 ms apart
            (10, 1_000, 1_000, 5_000, 50, 950, 10),
            // the rate governs: 1,000 at 100/s take 10 s although W is 1 s
            (1_000, 1_000, 100, 60_000, 5, 9_995, 100),
            // the deadline cuts the stretched schedule: 500 slots left go at D
            // (600 in the second before it: 100 regular + 500 forced)
            (1_000, 1_000, 100, 5_000, 5, 5_000, 600),
            // 2,000 over W = 10 s at R = 400: the window governs, 200/s
            (2_000, 10_000, 400, 30_000, 2, 9_997, 200),
            // 2,000 over W = 1 s at R = 400: the cap governs, 5 s
            (2_000, 1_000, 400, 30_000, 1, 4_998, 400),
            (1, 10_000, 400, 30_000, 5_000, 5_000, 1),
        ];
        for (n, w, r, d, first, last, per_second) in table {
            let slots = slot_times(n, w, r, d);
            assert_eq!(slots.len(), n);
            assert_eq!(slots[0], first, "first slot of {n}/{w}/{r}/{d}");
            assert_eq!(
                *slots.last().expect("last"),
                last,
                "last slot of {n}/{w}/{r}/{d}"
            );
            assert!(slots.windows(2).all(|p| p[0] <= p[1]), "slots are ordered");
            assert_eq!(
                max_in_window(&slots, 1_000),
                per_second,
                "per second for {n}/{w}/{r}/{d}"
            );
        }
        assert!(slot_times(0, 1_000, 10, 1_000).is_empty());
    }

    #[test]
    fn paced_rate_table() {
        let table = [
            (2_000, 10_000, 400, 200),
            (2_000, 1_000, 400, 400),
            (10, 1_000, 1_000, 10),
            (1, 10_000, 400, 1),
            (0, 10_000, 400, 1),
            (50_000, 10_000, 700, 700),
        ];
        for (n, w, r, expected) in table {
            assert_eq!(paced_rate(n, w, r), expected, "{n}/{w}/{r}");
        }
    }

    #[test]
    fn the_cap_holds_before_the_deadline() {
        for (n, w, r) in [
            (7, 100, 3),
            (5_000, 2_000, 333),
            (123, 60_000, 1),
            (50_000, 10_000, 2_000),
        ] {
            let slots = slot_times(n, w, r, u64::MAX);
            assert!(max_in_window(&slots, 1_000) as u64 <= r, "{n}/{w}/{r}");
        }
    }

    #[test]
    fn requests_validate_and_parse() {
        let request: DrainRequest = serde_json::from_str(
            r#"{"window_ms":10000,"max_rate":400,"deadline_ms":30000,"mode":"make_before_break","retry_jitter_ms":2000}"#,
        )
        .expect("parse");
        assert_eq!(request.mode, DrainMode::MakeBeforeBreak);
        assert_eq!(request.migrate_grace_ms, None);
        assert_eq!(request.validate(), Ok(()));
        let zero = DrainRequest {
            max_rate: 0,
            ..request
        };
        assert_eq!(zero.validate(), Err(DrainError::ZeroRate));
        assert!(serde_json::from_str::<DrainRequest>(r#"{"window_ms":1}"#).is_err());
        assert!(serde_json::from_str::<DrainRequest>(
            r#"{"window_ms":1,"max_rate":1,"deadline_ms":1,"mode":"close","bogus":1}"#
        )
        .is_err());
    }

    #[test]
    fn a_status_from_a_gateway_without_signals_sent_reads_as_zero() {
        let older = r#"{"active":true,"cancelled":false,"mode":"close","total":10,"remaining":4,
            "migrated_by_client":0,"closed_at_slot":6,"forced_at_deadline":0,"elapsed_ms":900,
            "schedule_ms":1000}"#;
        let status: DrainStatus = serde_json::from_str(older).expect("parse");
        assert_eq!(status.signals_sent, 0);
        assert_eq!((status.ended_otherwise, status.deadline_ms), (0, 0));
        assert_eq!(status.closed_at_slot, 6);
        let current = serde_json::to_value(DrainStatus {
            signals_sent: 6,
            ..status
        })
        .expect("json");
        assert_eq!(current["signals_sent"], 6);
    }
}
