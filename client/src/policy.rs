//! The client's decisions as plain functions: how long to wait before
//! reconnecting, what a close code means, which messages are duplicates.

use std::time::Duration;

use switchyard_protocol::{CloseClass, CloseCode, Position};

/// Exponential backoff with full jitter: attempt `n` waits a uniformly random
/// time in `[0, min(cap, base · 2^n)]`, so a crowd of clients that lost their
/// gateway at once does not come back at once. The first attempt after an
/// abnormal close (1006: no close frame, no hint — a crashed gateway, a
/// vanished node) of a connection that had been up waits over
/// `abnormal_window` instead: a crashed pod's clients all see it at the
/// same instant, and 0–`base` would bring them all back to the survivors
/// within 100 ms (tests/tests/crash.rs, bench/crash.sh).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The first attempt's ceiling.
    pub base: Duration,
    /// The largest ceiling.
    pub cap: Duration,
    /// The first wait after an abnormal close is uniform over this.
    pub abnormal_window: Duration,
}

/// The waits a close may call for, drawn before deciding.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Waits {
    /// The backoff of this attempt.
    pub backoff: Duration,
    /// The wait after an abnormal close of the session's connection: over
    /// [`Backoff::abnormal_window`] on the first attempt, the backoff after.
    pub abnormal: Duration,
}

impl Backoff {
    /// The waits of attempt `attempt` (0-based: 0 after a connection that
    /// stayed up), given `unit` uniform in [0, 1).
    pub fn waits(&self, attempt: u32, unit: f64) -> Waits {
        let backoff = self.delay(attempt, unit);
        let abnormal = if attempt == 0 {
            self.abnormal_window.mul_f64(unit.clamp(0.0, 1.0))
        } else {
            backoff
        };
        Waits { backoff, abnormal }
    }

    /// The ceiling of attempt `attempt` (0-based).
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// The wait before attempt `attempt`, given `unit` uniform in [0, 1).
    pub fn delay(&self, attempt: u32, unit: f64) -> Duration {
        self.ceiling(attempt).mul_f64(unit.clamp(0.0, 1.0))
    }
}

/// The longest wait a `retry_ms` hint can ask for; longer hints are
/// clamped (client/behaviour.json `max_retry_ms`).
pub const MAX_RETRY: Duration = Duration::from_secs(3600);

/// Where a connection stood when it closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Not welcomed yet: refused after the upgrade, or the attempt failed.
    Connecting,
    /// The session's connection.
    Open,
    /// The session's connection while a migration's new one is welcomed.
    OverlapOld,
    /// A migration's new connection.
    OverlapNew,
}

/// What to do after a connection closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterClose {
    /// Reconnect after this long, then resume every topic.
    Reconnect(Duration),
    /// Get fresh credentials, then reconnect after this long.
    Reauthenticate(Duration),
    /// Do not reconnect: the session ends.
    Stop,
    /// The migration's new connection becomes the session's.
    TakeOver,
    /// Stay on the session's (old) connection.
    Stay,
}

/// Decides from the close code, where the connection stood, the server's
/// `retry_ms` hint (which wins over the backoff: the server spreads its
/// clients on purpose; clamped to [`MAX_RETRY`]) and the waits of this
/// attempt (the abnormal one for a 1006 of the session's connection).
/// client/behaviour.json is the table both clients are tested against. A
/// terminal code ends the session in every phase: a revoked session is not
/// valid on another gateway either.
pub fn decide(code: u16, phase: Phase, retry_ms: Option<u64>, waits: Waits) -> AfterClose {
    let class = CloseCode::from_u16(code).class();
    if class == CloseClass::Terminal {
        return AfterClose::Stop;
    }
    match phase {
        Phase::OverlapOld => return AfterClose::TakeOver,
        Phase::OverlapNew => return AfterClose::Stay,
        Phase::Connecting | Phase::Open => {}
    }
    let wait = if code == 1006 && phase == Phase::Open {
        waits.abnormal
    } else {
        waits.backoff
    };
    let delay = retry_ms.map_or(wait, |ms| Duration::from_millis(ms).min(MAX_RETRY));
    match class {
        CloseClass::Reauthenticate => AfterClose::Reauthenticate(delay),
        _ => AfterClose::Reconnect(delay),
    }
}

/// Where the application stands on one topic: the last position delivered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cursor {
    last: Option<Position>,
}

impl Cursor {
    /// The last position delivered, to resume from.
    pub fn position(&self) -> Option<Position> {
        self.last
    }

    /// Whether a message at `position` is new (and if so, moves past it):
    /// a later offset in the same epoch, or any offset of a later epoch (a
    /// message of an earlier one is stale).
    /// Duplicates from a replay or an overlapping connection return false.
    pub fn accept(&mut self, position: Position) -> bool {
        let new = switchyard_protocol::position::is_after(self.last, position);
        if new {
            self.last = Some(position);
        }
        new
    }

    /// A `subscribed` frame: when the stream was not recovered, the log
    /// restarts at `head` (replayed messages, if any, follow a recovered one
    /// and move the cursor themselves).
    pub fn subscribed(&mut self, head: Position, recovered: bool) {
        if !recovered || self.last.is_none() {
            self.last = Some(head);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_table() {
        let backoff = Backoff {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(5),
            abnormal_window: Duration::from_secs(2),
        };
        let table = [
            (0, 1.0, 100),
            (1, 1.0, 200),
            (3, 1.0, 800),
            (6, 1.0, 5_000),
            (40, 1.0, 5_000),
            (3, 0.5, 400),
            (3, 0.0, 0),
        ];
        for (attempt, unit, expected_ms) in table {
            assert_eq!(
                backoff.delay(attempt, unit),
                Duration::from_millis(expected_ms),
                "attempt {attempt} unit {unit}"
            );
        }
    }

    /// After a connection that stayed up (attempt 0) an abnormal close waits
    /// over the whole window, 20 times the backoff's first ceiling; a
    /// gateway that crashes again before the connection is healthy gets the
    /// growing backoff instead (not the window over and over).
    #[test]
    fn the_first_wait_after_an_abnormal_close_spans_its_window() {
        let backoff = Backoff {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(5),
            abnormal_window: Duration::from_secs(2),
        };
        let ms = Duration::from_millis;
        let table = [
            (0, 0.0, 0, 0),
            (0, 0.5, 50, 1_000),
            (0, 1.0, 100, 2_000),
            (1, 1.0, 200, 200),
            (6, 0.5, 2_500, 2_500),
        ];
        for (attempt, unit, backoff_ms, abnormal_ms) in table {
            assert_eq!(
                backoff.waits(attempt, unit),
                Waits {
                    backoff: ms(backoff_ms),
                    abnormal: ms(abnormal_ms)
                },
                "attempt {attempt} unit {unit}"
            );
        }
    }

    /// Every row of client/behaviour.json, the table the browser client's
    /// tests read too. The hint goes through the close-reason parser, as
    /// it arrives (a negative one is no hint).
    #[test]
    fn behaviour_table() {
        let table: serde_json::Value =
            serde_json::from_str(include_str!("../behaviour.json")).expect("behaviour.json");
        assert_eq!(table["max_retry_ms"], MAX_RETRY.as_millis() as u64);
        let waits = Waits {
            backoff: Duration::from_millis(300),
            abnormal: Duration::from_millis(1_234),
        };
        let rows = table["rows"].as_array().expect("rows");
        assert!(rows.len() >= 30, "{} rows", rows.len());
        for row in rows {
            let code = row["code"].as_u64().expect("code") as u16;
            let phase = match row["phase"].as_str().expect("phase") {
                "connecting" => Phase::Connecting,
                "open" => Phase::Open,
                "overlap_old" => Phase::OverlapOld,
                "overlap_new" => Phase::OverlapNew,
                other => panic!("phase {other}"),
            };
            let reason = match &row["retry_ms"] {
                serde_json::Value::Null => String::new(),
                hint => format!(r#"{{"retry_ms": {hint}}}"#),
            };
            let retry_ms = switchyard_protocol::close::CloseReason::parse(&reason).retry_ms;
            let wait = match &row["wait"] {
                serde_json::Value::String(kind) if kind == "backoff" => waits.backoff,
                serde_json::Value::String(kind) if kind == "abnormal" => waits.abnormal,
                serde_json::Value::Number(ms) => Duration::from_millis(ms.as_u64().expect("ms")),
                _ => Duration::ZERO,
            };
            let expected = match row["action"].as_str().expect("action") {
                "reconnect" => AfterClose::Reconnect(wait),
                "reauthenticate" => AfterClose::Reauthenticate(wait),
                "stop" => AfterClose::Stop,
                "take_over" => AfterClose::TakeOver,
                "stay" => AfterClose::Stay,
                other => panic!("action {other}"),
            };
            assert_eq!(decide(code, phase, retry_ms, waits), expected, "{row}");
        }
    }

    #[test]
    fn cursor_drops_duplicates_and_follows_new_epochs() {
        let mut cursor = Cursor::default();
        let table = [
            (Position::new(7, 1), true),
            (Position::new(7, 2), true),
            (Position::new(7, 2), false),
            (Position::new(7, 1), false),
            (Position::new(7, 3), true),
            (Position::new(9, 1), true),
            (Position::new(9, 1), false),
            // a late message of the epoch the log moved past is stale
            (Position::new(7, 4), false),
        ];
        for (position, expected) in table {
            assert_eq!(cursor.accept(position), expected, "{position}");
        }
        assert_eq!(cursor.position(), Some(Position::new(9, 1)));
        cursor.subscribed(Position::new(9, 5), true);
        assert_eq!(
            cursor.position(),
            Some(Position::new(9, 1)),
            "replay follows"
        );
        cursor.subscribed(Position::new(11, 4), false);
        assert_eq!(
            cursor.position(),
            Some(Position::new(11, 4)),
            "not recovered: from the head"
        );
        let mut fresh = Cursor::default();
        fresh.subscribed(Position::new(3, 10), true);
        assert_eq!(fresh.position(), Some(Position::new(3, 10)));
        assert!(!fresh.accept(Position::new(3, 10)));
        assert!(fresh.accept(Position::new(3, 11)));
    }
}
