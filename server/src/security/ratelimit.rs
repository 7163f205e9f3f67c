//! Token buckets: the per-connection publish rate and the per-IP handshake
//! rate. Time is passed in, so the arithmetic is tested as plain data.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

/// A token bucket: `rate` tokens per second, holding at most `burst`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    updated: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate_per_s: u32, burst: u32, now: Instant) -> Self {
        TokenBucket {
            rate: f64::from(rate_per_s),
            burst: f64::from(burst.max(1)),
            tokens: f64::from(burst.max(1)),
            updated: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.updated = now;
    }

    /// Takes a token if there is one.
    pub fn try_take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// When the bucket next holds a token (`now` if it does).
    pub fn next_token(&mut self, now: Instant) -> Instant {
        self.refill(now);
        if self.tokens >= 1.0 {
            return now;
        }
        // A zero rate never refills: an hour stands in for never.
        let wait = std::time::Duration::try_from_secs_f64((1.0 - self.tokens) / self.rate)
            .unwrap_or(std::time::Duration::from_secs(3600));
        now + wait
    }

    /// Whether the bucket has refilled completely (it then carries no state
    /// worth keeping).
    pub fn is_full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= self.burst
    }
}

/// One token bucket per client IP, bounded in size: when it holds
/// `max_tracked` addresses, full buckets (idle addresses) are dropped first;
/// if every tracked address is busy, an unknown address is refused rather
/// than let the table grow (a flood from many addresses is still bounded).
/// The sweep walks the whole table, so it runs at most once a second: a
/// flood of new addresses against a full table costs a lookup each, not a walk.
pub struct IpRateLimiter {
    rate: u32,
    burst: u32,
    max_tracked: usize,
    table: Mutex<Table>,
}

struct Table {
    buckets: HashMap<IpAddr, TokenBucket>,
    last_sweep: Option<Instant>,
}

/// Least time between two sweeps of a full table.
const SWEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

impl IpRateLimiter {
    /// A limiter of `rate` handshakes per second and `burst` per address.
    pub fn new(rate: u32, burst: u32, max_tracked: usize) -> Self {
        IpRateLimiter {
            rate,
            burst,
            max_tracked: max_tracked.max(1),
            table: Mutex::new(Table {
                buckets: HashMap::new(),
                last_sweep: None,
            }),
        }
    }

    /// Whether `ip` may start a handshake now.
    pub fn allow(&self, ip: IpAddr, now: Instant) -> bool {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if !table.buckets.contains_key(&ip) && table.buckets.len() >= self.max_tracked {
            let due = table
                .last_sweep
                .is_none_or(|at| now.saturating_duration_since(at) >= SWEEP_INTERVAL);
            if due {
                table.last_sweep = Some(now);
                table.buckets.retain(|_, bucket| !bucket.is_full(now));
            }
            if table.buckets.len() >= self.max_tracked {
                return false;
            }
        }
        table
            .buckets
            .entry(ip)
            .or_insert_with(|| TokenBucket::new(self.rate, self.burst, now))
            .try_take(now)
    }

    /// Addresses currently tracked.
    #[cfg(test)]
    pub fn tracked(&self) -> usize {
        self.table
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .buckets
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn bucket_spends_its_burst_then_refills_at_the_rate() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(10, 3, t0);
        let ms = |n| t0 + Duration::from_millis(n);
        // (time, expected) in order: 3 from the burst, then one per 100 ms.
        let table = [
            (0, true),
            (0, true),
            (0, true),
            (0, false),
            (50, false),
            (100, true),
            (150, false),
            (200, true),
            (10_000, true),
            (10_000, true),
            (10_000, true),
            (10_000, false),
        ];
        for (at, expected) in table {
            assert_eq!(bucket.try_take(ms(at)), expected, "at {at} ms");
        }
    }

    #[test]
    fn limiter_is_per_address_and_bounded() {
        let t0 = Instant::now();
        let limiter = IpRateLimiter::new(1, 2, 2);
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let b: IpAddr = "10.0.0.2".parse().expect("ip");
        let c: IpAddr = "10.0.0.3".parse().expect("ip");
        assert!(limiter.allow(a, t0));
        assert!(limiter.allow(a, t0));
        assert!(!limiter.allow(a, t0), "a spent its burst");
        assert!(limiter.allow(b, t0), "b has its own bucket");
        // Two busy addresses fill the table: a third is refused, not tracked.
        assert!(!limiter.allow(c, t0));
        assert_eq!(limiter.tracked(), 2);
        // Once a and b have refilled, they are forgotten and c gets a bucket.
        let later = t0 + Duration::from_secs(5);
        assert!(limiter.allow(c, later));
        assert_eq!(limiter.tracked(), 1);
    }

    #[test]
    fn a_full_table_is_swept_at_most_once_a_second() {
        let t0 = Instant::now();
        let limiter = IpRateLimiter::new(100, 1, 1);
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let b: IpAddr = "10.0.0.2".parse().expect("ip");
        assert!(limiter.allow(a, t0));
        assert!(!limiter.allow(b, t0), "swept at t0: a is busy");
        // a has refilled, but the next sweep is not due before t0 + 1 s.
        assert!(!limiter.allow(b, t0 + Duration::from_millis(500)));
        assert!(limiter.allow(b, t0 + Duration::from_secs(1)));
    }
}
