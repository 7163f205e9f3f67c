//! The client's decisions as plain functions: how long to wait before
//! reconnecting, what a close code means, which messages are duplicates.

use std::time::Duration;

use switchyard_protocol::{CloseClass, CloseCode, Position};

/// Exponential backoff with full jitter: attempt `n` waits a uniformly random
/// time in `[0, min(cap, base · 2^n)]`, so a crowd of clients that lost their
/// gateway at once does not come back at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The first attempt's ceiling.
    pub base: Duration,
    /// The largest ceiling.
    pub cap: Duration,
}

impl Backoff {
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

/// What to do after a connection closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterClose {
    /// Reconnect after this long, then resume every topic.
    Reconnect(Duration),
    /// Get fresh credentials, then reconnect after this long.
    Reauthenticate(Duration),
    /// Do not reconnect.
    Stop,
}

/// Decides from the close code, the server's `retry_ms` hint (which wins
/// over the backoff: the server spreads its clients on purpose) and the
/// backoff for this attempt.
pub fn after_close(code: u16, retry_ms: Option<u64>, backoff_delay: Duration) -> AfterClose {
    let delay = retry_ms.map_or(backoff_delay, Duration::from_millis);
    match CloseCode::from_u16(code).class() {
        CloseClass::Reconnect => AfterClose::Reconnect(delay),
        CloseClass::Reauthenticate => AfterClose::Reauthenticate(delay),
        CloseClass::Terminal => AfterClose::Stop,
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

    #[test]
    fn close_table() {
        let backoff = Duration::from_millis(300);
        let table = [
            (
                4000,
                Some(1830),
                AfterClose::Reconnect(Duration::from_millis(1830)),
            ),
            (4000, None, AfterClose::Reconnect(backoff)),
            (1001, None, AfterClose::Reconnect(backoff)),
            (1006, None, AfterClose::Reconnect(backoff)),
            (
                4002,
                Some(50),
                AfterClose::Reconnect(Duration::from_millis(50)),
            ),
            (4001, None, AfterClose::Reauthenticate(backoff)),
            (4501, None, AfterClose::Reauthenticate(backoff)),
            (1000, None, AfterClose::Stop),
            (1009, None, AfterClose::Stop),
            (4500, Some(10), AfterClose::Stop),
            (4503, None, AfterClose::Stop),
        ];
        for (code, retry, expected) in table {
            assert_eq!(
                after_close(code, retry, backoff),
                expected,
                "{code} {retry:?}"
            );
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
