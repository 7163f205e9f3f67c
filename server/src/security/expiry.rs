//! When sessions expire: one ordered set for the whole gateway, served by
//! one task (`server::session_expiry_loop`), instead of a timer per connection.

use std::collections::BTreeSet;
use std::sync::Mutex;

use tokio::sync::Notify;

/// Connections by the Unix millisecond at which their session expires.
#[derive(Default)]
pub struct SessionExpiries {
    queue: Mutex<BTreeSet<(u64, u64)>>,
    /// Notified when an entry earlier than every other is added.
    pub changed: Notify,
}

impl SessionExpiries {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeSet<(u64, u64)>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Schedules connection `conn_id` to expire at `at_ms`.
    pub fn insert(&self, at_ms: u64, conn_id: u64) {
        let mut queue = self.lock();
        let earliest = queue.first().is_none_or(|&(first, _)| at_ms < first);
        queue.insert((at_ms, conn_id));
        drop(queue);
        if earliest {
            self.changed.notify_one();
        }
    }

    /// Forgets a connection that ended before its session did.
    pub fn remove(&self, at_ms: u64, conn_id: u64) {
        self.lock().remove(&(at_ms, conn_id));
    }

    /// Removes and returns the connections due at `now_ms`, and the next
    /// expiry after them.
    pub fn take_due(&self, now_ms: u64) -> (Vec<u64>, Option<u64>) {
        let mut queue = self.lock();
        let mut due = Vec::new();
        while let Some(&(at, id)) = queue.first() {
            if at > now_ms {
                return (due, Some(at));
            }
            queue.pop_first();
            due.push(id);
        }
        (due, None)
    }

    /// Whether nothing is scheduled.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_in_order_and_removable() {
        let expiries = SessionExpiries::default();
        expiries.insert(300, 3);
        expiries.insert(100, 1);
        expiries.insert(200, 2);
        expiries.insert(100, 4);
        expiries.remove(200, 2);
        assert_eq!(expiries.take_due(50), (vec![], Some(100)));
        assert_eq!(expiries.take_due(100), (vec![1, 4], Some(300)));
        assert_eq!(expiries.take_due(1000), (vec![3], None));
        assert!(expiries.is_empty());
    }
}
