//! `TopicLog`: one topic's bounded history and the resume decision. Pure data
//! and arithmetic, no locks and no I/O, so every edge case is a table test.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use switchyard_protocol::Position;

/// How much history a log keeps.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// Most entries kept.
    pub max_entries: usize,
    /// Oldest entry kept.
    pub max_age: Duration,
}

#[derive(Debug, Clone)]
struct Entry<T> {
    offset: u64,
    at: Instant,
    payload: T,
}

/// The outcome of asking to resume from a position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    /// Nothing to replay: no `since` given, or the subscriber is at the head.
    UpToDate,
    /// Replay every entry after this offset; the stream is continuous.
    ReplayAfter(u64),
    /// The position cannot be continued without a gap (another epoch, trimmed
    /// history, or an offset past the head): start from the head, not recovered.
    Lost,
    /// The position is in an epoch the log has moved past (its history was
    /// lost), and the log still holds the whole new epoch (offsets 1 ..=
    /// head): not recovered, but the new epoch is replayed from its start,
    /// so nothing published since the loss is skipped.
    Restarted,
}

impl Resume {
    /// Whether the subscriber's stream continues without a gap.
    pub fn recovered(self) -> bool {
        !matches!(self, Resume::Lost | Resume::Restarted)
    }
}

/// A topic log: epoch, head offset and the retained tail of entries.
#[derive(Debug, Clone)]
pub struct TopicLog<T> {
    epoch: u64,
    head: u64,
    entries: VecDeque<Entry<T>>,
    retention: Retention,
}

impl<T: Clone> TopicLog<T> {
    /// An empty log in `epoch`.
    pub fn new(epoch: u64, retention: Retention) -> Self {
        TopicLog {
            epoch,
            head: 0,
            entries: VecDeque::new(),
            retention,
        }
    }

    /// The position of the last assigned offset.
    pub fn head(&self) -> Position {
        Position::new(self.epoch, self.head)
    }

    /// The position the next append will get.
    pub fn next_position(&self) -> Position {
        Position::new(self.epoch, self.head + 1)
    }

    /// Whether no entries are retained.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Retained entries.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Appends the payload for [`Self::next_position`] and trims the history.
    pub fn append(&mut self, payload: T, now: Instant) -> Position {
        self.head += 1;
        if self.retention.max_entries > 0 {
            self.entries.push_back(Entry {
                offset: self.head,
                at: now,
                payload,
            });
        }
        self.trim(now);
        self.head()
    }

    /// Drops entries beyond the count bound or older than the age bound.
    pub fn trim(&mut self, now: Instant) {
        while self.entries.len() > self.retention.max_entries {
            self.entries.pop_front();
        }
        while let Some(front) = self.entries.front() {
            if now.saturating_duration_since(front.at) > self.retention.max_age {
                self.entries.pop_front();
            } else {
                break;
            }
        }
    }

    /// Decides how a subscriber at `since` continues. Call [`Self::trim`] first
    /// so that expired entries are not served.
    pub fn resume(&self, since: Option<Position>) -> Resume {
        let Some(since) = since else {
            return Resume::UpToDate;
        };
        if since.epoch != self.epoch || since.offset > self.head {
            return Resume::Lost;
        }
        if since.offset == self.head {
            return Resume::UpToDate;
        }
        // Entries since.offset+1 ..= head must all still be retained.
        match self.entries.front() {
            Some(oldest) if oldest.offset <= since.offset + 1 => Resume::ReplayAfter(since.offset),
            _ => Resume::Lost,
        }
    }

    /// Retained payloads with an offset greater than `after`, oldest first.
    pub fn entries_after(&self, after: u64) -> impl Iterator<Item = (u64, &T)> {
        // Offsets are consecutive, so the start index is arithmetic.
        let skip = self
            .entries
            .front()
            .map_or(0, |oldest| after.saturating_sub(oldest.offset - 1) as usize);
        self.entries
            .iter()
            .skip(skip)
            .map(|entry| (entry.offset, &entry.payload))
    }
}

/// Decides how a subscriber at `since` continues from a snapshot of a shared
/// log: its `head` and the offsets fetched after `since` (any order). The
/// stream is continuous only if exactly `since+1 ..= head` were fetched.
pub fn resume_from_snapshot(since: Option<Position>, head: Position, fetched: &[u64]) -> Resume {
    let Some(since) = since else {
        return Resume::UpToDate;
    };
    if since.epoch != head.epoch {
        let whole = fetched.len() as u64 == head.offset
            && fetched
                .iter()
                .all(|&offset| (1..=head.offset).contains(&offset));
        return if whole {
            Resume::Restarted
        } else {
            Resume::Lost
        };
    }
    if since.offset > head.offset {
        return Resume::Lost;
    }
    if since.offset == head.offset {
        return Resume::UpToDate;
    }
    let wanted = head.offset - since.offset;
    let complete = fetched.len() as u64 == wanted
        && fetched
            .iter()
            .all(|&offset| offset > since.offset && offset <= head.offset);
    if complete {
        Resume::ReplayAfter(since.offset)
    } else {
        Resume::Lost
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EPOCH: u64 = 42;

    #[test]
    fn snapshot_resume_table() {
        let head = Position::new(EPOCH, 10);
        let whole: Vec<u64> = (1..=10).rev().collect();
        let table: [(Option<Position>, &[u64], Resume); 10] = [
            (None, &[], Resume::UpToDate),
            (Some(Position::new(EPOCH, 10)), &[], Resume::UpToDate),
            (
                Some(Position::new(EPOCH, 7)),
                &[10, 9, 8],
                Resume::ReplayAfter(7),
            ),
            (Some(Position::new(EPOCH, 7)), &[10, 9], Resume::Lost),
            (Some(Position::new(EPOCH, 0)), &[], Resume::Lost),
            (Some(Position::new(EPOCH, 11)), &[], Resume::Lost),
            (Some(Position::new(EPOCH + 1, 7)), &[10, 9, 8], Resume::Lost),
            (Some(Position::new(EPOCH, 7)), &[10, 9, 7], Resume::Lost),
            // from an epoch the log moved past, with the new epoch all there
            (Some(Position::new(EPOCH + 1, 7)), &whole, Resume::Restarted),
            (
                Some(Position::new(EPOCH - 1, 70)),
                &whole[1..],
                Resume::Lost,
            ),
        ];
        for (since, fetched, expected) in table {
            assert_eq!(
                resume_from_snapshot(since, head, fetched),
                expected,
                "{since:?} {fetched:?}"
            );
        }
    }

    fn log_with(max_entries: usize, appended: u64) -> (TopicLog<u64>, Instant) {
        let now = Instant::now();
        let mut log = TopicLog::new(
            EPOCH,
            Retention {
                max_entries,
                max_age: Duration::from_secs(60),
            },
        );
        for n in 1..=appended {
            assert_eq!(log.append(n, now), Position::new(EPOCH, n));
        }
        (log, now)
    }

    #[test]
    fn resume_table() {
        // (retained, appended, since, expected, replayed offsets)
        type Row = (usize, u64, Option<Position>, Resume, Vec<u64>);
        let table: Vec<Row> = vec![
            (10, 5, None, Resume::UpToDate, vec![]),
            (
                10,
                5,
                Some(Position::new(EPOCH, 5)),
                Resume::UpToDate,
                vec![],
            ),
            (
                10,
                5,
                Some(Position::new(EPOCH, 2)),
                Resume::ReplayAfter(2),
                vec![3, 4, 5],
            ),
            (
                10,
                5,
                Some(Position::new(EPOCH, 0)),
                Resume::ReplayAfter(0),
                vec![1, 2, 3, 4, 5],
            ),
            (
                10,
                0,
                Some(Position::new(EPOCH, 0)),
                Resume::UpToDate,
                vec![],
            ),
            // history holds 6..=8: a subscriber at 5 misses nothing, at 4 misses 5.
            (
                3,
                8,
                Some(Position::new(EPOCH, 5)),
                Resume::ReplayAfter(5),
                vec![6, 7, 8],
            ),
            (3, 8, Some(Position::new(EPOCH, 4)), Resume::Lost, vec![]),
            (
                3,
                8,
                Some(Position::new(EPOCH, 7)),
                Resume::ReplayAfter(7),
                vec![8],
            ),
            (
                10,
                5,
                Some(Position::new(EPOCH + 1, 2)),
                Resume::Lost,
                vec![],
            ),
            (10, 5, Some(Position::new(EPOCH, 6)), Resume::Lost, vec![]),
            // no history kept at all: only a subscriber at the head is continuous.
            (
                0,
                5,
                Some(Position::new(EPOCH, 5)),
                Resume::UpToDate,
                vec![],
            ),
            (0, 5, Some(Position::new(EPOCH, 4)), Resume::Lost, vec![]),
        ];
        for (retained, appended, since, expected, replay) in table {
            let (log, _) = log_with(retained, appended);
            let resume = log.resume(since);
            assert_eq!(
                resume, expected,
                "retained {retained}, appended {appended}, since {since:?}"
            );
            if let Resume::ReplayAfter(after) = resume {
                let offsets: Vec<u64> = log.entries_after(after).map(|(o, _)| o).collect();
                let payloads: Vec<u64> = log.entries_after(after).map(|(_, p)| *p).collect();
                assert_eq!(offsets, replay);
                assert_eq!(payloads, replay);
            }
        }
    }

    #[test]
    fn age_trims_history() {
        let (mut log, start) = log_with(10, 3);
        log.trim(start + Duration::from_secs(61));
        assert!(log.is_empty());
        assert_eq!(
            log.head(),
            Position::new(EPOCH, 3),
            "head survives trimming"
        );
        assert_eq!(log.resume(Some(Position::new(EPOCH, 1))), Resume::Lost);
        assert_eq!(log.resume(Some(Position::new(EPOCH, 3))), Resume::UpToDate);
        assert_eq!(log.next_position(), Position::new(EPOCH, 4));
    }

    #[test]
    fn count_bound_holds() {
        let (log, _) = log_with(4, 100);
        assert_eq!(log.len(), 4);
        let offsets: Vec<u64> = log.entries_after(0).map(|(o, _)| o).collect();
        assert_eq!(offsets, vec![97, 98, 99, 100]);
    }
}
