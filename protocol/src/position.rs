//! Positions in a topic log.

use serde::{Deserialize, Serialize};

/// Where a message sits in a topic log, or how far a subscriber has read.
///
/// `epoch` identifies one incarnation of the log: when a log is lost (a
/// restart of an in-memory broker, a flushed backplane) it gets a new epoch,
/// so a client holding a position from the old one learns that it cannot be
/// resumed. `offset` counts messages from 1 within an epoch; offset 0 means
/// "nothing yet". Epochs stay below 2^53 so JavaScript numbers hold them.
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

/// Whether a message at `next` comes after `last` (the last one processed):
/// a later offset in the same epoch, or any offset of another epoch (the log
/// started over). With no `last`, everything does. This one rule drops
/// replay and overlap duplicates in gateways and clients alike.
pub fn is_after(last: Option<Position>, next: Position) -> bool {
    match last {
        None => true,
        Some(last) => last.epoch != next.epoch || next.offset > last.offset,
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
        ];
        for (last, next, expected) in table {
            assert_eq!(is_after(last, next), expected, "{last:?} {next:?}");
        }
    }
}
