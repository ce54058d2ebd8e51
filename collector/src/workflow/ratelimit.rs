//! Token buckets per key (a principal's `sub`, or a client address): enough to stop a
//! script from flooding approvers or the token exchange, small enough to forget idle keys.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

pub struct RateLimit {
    /// Requests allowed at once.
    burst: f64,
    /// Requests allowed per second, sustained.
    per_second: f64,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl RateLimit {
    pub fn new(burst: u32, per_second: f64) -> RateLimit {
        RateLimit {
            burst: burst as f64,
            per_second,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token for `key`; false when its bucket is empty.
    pub fn allow(&self, key: &str) -> bool {
        self.allow_at(key, Instant::now())
    }

    pub fn allow_at(&self, key: &str, now: Instant) -> bool {
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() > 10_000 {
            // Forget the keys whose buckets have filled up again: they lose nothing.
            let full_after = self.burst / self.per_second;
            buckets.retain(|_, (_, at)| now.duration_since(*at).as_secs_f64() < full_after);
        }
        let (tokens, at) = buckets.entry(key.to_string()).or_insert((self.burst, now));
        let refill = now.saturating_duration_since(*at).as_secs_f64() * self.per_second;
        *tokens = (*tokens + refill).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_burst_then_the_sustained_rate_per_key() {
        let limit = RateLimit::new(3, 1.0);
        let t0 = Instant::now();
        assert!((0..3).all(|_| limit.allow_at("alice", t0)));
        assert!(!limit.allow_at("alice", t0));
        assert!(limit.allow_at("bob", t0), "another key has its own bucket");
        assert!(!limit.allow_at("alice", t0 + Duration::from_millis(500)));
        assert!(limit.allow_at("alice", t0 + Duration::from_millis(1600)));
    }
}
