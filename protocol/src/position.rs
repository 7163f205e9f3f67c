//! Positions in a topic log.

use serde::{Deserialize, Serialize};

/// Where a message sits in a topic log, or how far a subscriber has read.
///
/// `epoch` identifies one incarnation of the log: when a log is lost (a
/// restart of an in-memory broker, a flushed backplane) it gets a new epoch,
/// so a client holding a position from the old one learns that it cannot be
/// resumed. Epochs are ordered: a later incarnation has a larger epoch (see
/// [`epoch_at`]), so a frame of an epoch a log has moved past is recognised
/// as stale wherever it turns up. `offset` counts messages from 1 within an
/// epoch; offset 0 means "nothing yet". Epochs stay below 2^53 so
/// JavaScript numbers hold them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Position {
    /// The log incarnation.
    pub epoch: u64,
    /// The last offset seen (a subscriber) or assigned (a message).
    pub offset: u64,
}

/// The largest epoch value: epochs must survive a round trip through a JavaScript number.
pub const MAX_EPOCH: u64 = (1 << 53) - 1;

impl Position {
    /// A position in `epoch` at `offset`.
    pub fn new(epoch: u64, offset: u64) -> Self {
        Position { epoch, offset }
    }
}

/// Low bits of an epoch that break ties between incarnations begun in the
/// same millisecond (random): an epoch is `unix_ms << EPOCH_TIE_BITS | tie`.
pub const EPOCH_TIE_BITS: u32 = 11;

/// The epoch of an incarnation begun at `unix_ms` with tie-breaker `tie`
/// (its low [`EPOCH_TIE_BITS`] bits are used), and never at or below
/// `floor`, the newest epoch the caller knows the log had: succession stays
/// ordered even when a clock steps back. `publish.lua` and `snapshot.lua`
/// compute the same from Redis' `TIME`. 2^53 ms >> 11 lasts until 2109.
pub fn epoch_at(unix_ms: u64, tie: u64, floor: u64) -> u64 {
    let tie = tie & ((1 << EPOCH_TIE_BITS) - 1);
    let by_time = (unix_ms << EPOCH_TIE_BITS) | tie;
    by_time.max(floor + 1).min(MAX_EPOCH)
}

/// Whether a message at `next` comes after `last` (the last one processed):
/// a later offset in the same epoch, or any offset of a later epoch (the log
/// started over). A message of an earlier epoch is stale: its log was
/// replaced, and whoever processed `last` has been told so. With no `last`,
/// everything comes after. This one rule drops replay and overlap duplicates
/// and stale incarnations in gateways and clients alike.
pub fn is_after(last: Option<Position>, next: Position) -> bool {
    match last {
        None => true,
        Some(last) => {
            next.epoch > last.epoch || (next.epoch == last.epoch && next.offset > last.offset)
        }
    }
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.epoch, self.offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_after_table() {
        let table = [
            (None, Position::new(42, 1), true),
            (Some(Position::new(42, 5)), Position::new(42, 6), true),
            (Some(Position::new(42, 5)), Position::new(42, 5), false),
            (Some(Position::new(42, 5)), Position::new(42, 3), false),
            (Some(Position::new(42, 5)), Position::new(43, 1), true),
            // an epoch the log has moved past is stale, whatever its offset
            (Some(Position::new(42, 5)), Position::new(41, 9), false),
            (Some(Position::new(42, 0)), Position::new(41, 1), false),
        ];
        for (last, next, expected) in table {
            assert_eq!(is_after(last, next), expected, "{last:?} {next:?}");
        }
    }

    #[test]
    fn epochs_follow_time_and_never_fall_to_the_floor() {
        let ms = 1_796_000_000_000; // December 2026
        assert_eq!(epoch_at(ms, 5, 0), (ms << 11) | 5);
        assert!(epoch_at(ms + 1, 0, 0) > epoch_at(ms, 2047, 0));
        // only the low bits break ties
        assert_eq!(epoch_at(ms, 2048 + 5, 0), epoch_at(ms, 5, 0));
        // a clock that stepped back still succeeds the known epoch
        let known = epoch_at(ms, 7, 0);
        assert_eq!(epoch_at(ms - 60_000, 3, known), known + 1);
        assert!(epoch_at(u64::MAX >> 11, 0, 0) <= MAX_EPOCH);
        assert!(epoch_at(ms, 0, 0) < MAX_EPOCH, "until 2109");
    }
}
