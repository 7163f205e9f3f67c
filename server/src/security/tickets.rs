//! Single-use connection tickets.
//!
//! A browser cannot set an `Authorization` header on a WebSocket, and a
//! long-lived token in `?token=` ends up in proxy logs and browser history.
//! Instead the application backend, which has already authenticated the
//! user, mints a ticket through `POST /api/tickets` (admin listener); the page
//! puts it in `?ticket=`. A ticket is random, expires within seconds and is
//! deleted when redeemed, so a copy in a log is worthless.
//!
//! Tickets live in a [`TicketStore`]: the memory broker's [`TicketBook`]
//! (this process), or Redis with the Redis broker, so any pod can redeem
//! what another minted. Authentication depends on the store, not on the
//! broker that happens to implement it.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use rand::RngCore;
use serde::{Deserialize, Serialize};

/// Why a ticket could not be stored or redeemed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TicketError {
    /// The store holds its maximum of outstanding tickets.
    #[error("{0}")]
    Full(String),
    /// The store cannot be reached.
    #[error("ticket store unavailable: {0}")]
    Unavailable(String),
}

/// Where single-use tickets are kept until redeemed or expired.
pub trait TicketStore: Send + Sync + 'static {
    /// Stores a ticket (its grant, as JSON) for `ttl`, where every gateway
    /// sharing this store can redeem it.
    fn store_ticket<'a>(
        &'a self,
        ticket: &'a str,
        grant_json: String,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), TicketError>>;

    /// Removes a ticket and returns its grant, if it existed and had not
    /// expired: a ticket is redeemed once.
    fn take_ticket<'a>(
        &'a self,
        ticket: &'a str,
    ) -> BoxFuture<'a, Result<Option<String>, TicketError>>;
}

/// What a ticket stands for: the session it opens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TicketGrant {
    /// The subject.
    pub sub: String,
    /// Subscribe patterns; `None`: the gateway default.
    pub subscribe: Option<Vec<String>>,
    /// Publish patterns; `None`: the gateway default.
    pub publish: Option<Vec<String>>,
    /// Unix seconds at which the session expires.
    pub exp: u64,
    /// Unix seconds at which the ticket was minted (revocations before it do not apply).
    pub minted_at: u64,
}

/// A new ticket: 256 random bits, hex.
pub fn new_ticket() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether `text` has the shape of a ticket (so garbage never reaches a store).
pub fn is_well_formed(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Why a ticket could not be stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("too many outstanding tickets ({0}); redeem or let some expire")]
pub struct TicketBookFull(pub usize);

/// In-process ticket store, bounded: expired tickets are swept when the book
/// is full, and a full book of live tickets refuses new ones.
#[derive(Debug)]
pub struct TicketBook<V> {
    max_outstanding: usize,
    tickets: HashMap<String, (V, Instant)>,
}

impl<V> TicketBook<V> {
    /// An empty book holding at most `max_outstanding` tickets.
    pub fn new(max_outstanding: usize) -> Self {
        TicketBook {
            max_outstanding: max_outstanding.max(1),
            tickets: HashMap::new(),
        }
    }

    /// Stores `ticket` for `grant`, valid for `ttl` from `now`.
    pub fn insert(
        &mut self,
        ticket: String,
        grant: V,
        ttl: Duration,
        now: Instant,
    ) -> Result<(), TicketBookFull> {
        if self.tickets.len() >= self.max_outstanding {
            self.tickets.retain(|_, (_, expires)| *expires > now);
            if self.tickets.len() >= self.max_outstanding {
                return Err(TicketBookFull(self.max_outstanding));
            }
        }
        self.tickets.insert(ticket, (grant, now + ttl));
        Ok(())
    }

    /// Removes `ticket` and returns its grant if it had not expired.
    pub fn redeem(&mut self, ticket: &str, now: Instant) -> Option<V> {
        let (grant, expires) = self.tickets.remove(ticket)?;
        (expires > now).then_some(grant)
    }

    /// Tickets held (some may have expired).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.tickets.len()
    }

    /// Whether no ticket is held.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.tickets.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(sub: &str) -> TicketGrant {
        TicketGrant {
            sub: sub.into(),
            subscribe: None,
            publish: None,
            exp: 2_000_000_000,
            minted_at: 1_700_000_000,
        }
    }

    #[test]
    fn tickets_are_single_use_and_expire() {
        let t0 = Instant::now();
        let ttl = Duration::from_secs(30);
        let mut book = TicketBook::new(10);
        let (a, b) = (new_ticket(), new_ticket());
        assert_ne!(a, b);
        assert!(is_well_formed(&a));
        book.insert(a.clone(), grant("alice"), ttl, t0)
            .expect("room");
        book.insert(b.clone(), grant("bob"), ttl, t0).expect("room");
        assert_eq!(book.redeem(&a, t0).map(|g| g.sub), Some("alice".into()));
        assert_eq!(book.redeem(&a, t0), None, "a replayed ticket is refused");
        assert_eq!(book.redeem(&b, t0 + ttl), None, "expired at its ttl");
        assert!(book.is_empty(), "an expired ticket is gone once tried");
        assert_eq!(book.redeem("nope", t0), None);
    }

    #[test]
    fn a_full_book_sweeps_expired_tickets_then_refuses() {
        let t0 = Instant::now();
        let ttl = Duration::from_secs(1);
        let mut book = TicketBook::new(2);
        book.insert(new_ticket(), grant("a"), ttl, t0)
            .expect("room");
        book.insert(new_ticket(), grant("b"), ttl, t0)
            .expect("room");
        assert_eq!(
            book.insert(new_ticket(), grant("c"), ttl, t0),
            Err(TicketBookFull(2))
        );
        let later = t0 + Duration::from_secs(2);
        book.insert(new_ticket(), grant("c"), ttl, later)
            .expect("expired ones were swept");
        assert_eq!(book.len(), 1);
    }

    #[test]
    fn ticket_shape() {
        for (text, ok) in [
            ("", false),
            ("abc", false),
            (&"g".repeat(64), false),
            (&"0a".repeat(32), true),
            (&"0a".repeat(33), false),
        ] {
            assert_eq!(is_well_formed(text), ok, "{text}");
        }
    }
}
