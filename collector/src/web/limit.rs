//! Sign-in attempts per client address: a fixed window per IP, so one address cannot
//! hammer the provider through us or guess at `/api/v1/login` with stolen ID tokens.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Addresses remembered at most; past this, windows that ended are forgotten first.
const MAX_TRACKED: usize = 10_000;

pub struct RateLimiter {
    per_window: u32,
    window: Duration,
    seen: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

impl RateLimiter {
    pub fn new(per_window: u32, window: Duration) -> RateLimiter {
        RateLimiter {
            per_window,
            window,
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// Counts one attempt from `ip`; false when it is over the limit. A request whose
    /// address is unknown counts against one shared bucket.
    pub fn allow(&self, ip: Option<IpAddr>, now: Instant) -> bool {
        let ip = ip.unwrap_or(IpAddr::from([0, 0, 0, 0]));
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.len() >= MAX_TRACKED && !seen.contains_key(&ip) {
            let window = self.window;
            seen.retain(|_, (start, _)| now.duration_since(*start) < window);
            if seen.len() >= MAX_TRACKED {
                // Every slot is live: refuse newcomers rather than grow without bound.
                return false;
            }
        }
        let entry = seen.entry(ip).or_insert((now, 0));
        if now.duration_since(entry.0) >= self.window {
            *entry = (now, 0);
        }
        entry.1 += 1;
        entry.1 <= self.per_window
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_address_has_its_own_window() {
        let limiter = RateLimiter::new(3, Duration::from_secs(60));
        let t0 = Instant::now();
        let a = Some(IpAddr::from([127, 0, 0, 1]));
        let b = Some(IpAddr::from([127, 0, 0, 2]));
        assert!((0..3).all(|_| limiter.allow(a, t0)));
        assert!(!limiter.allow(a, t0 + Duration::from_secs(1)));
        assert!(limiter.allow(b, t0 + Duration::from_secs(1)));
        assert!(limiter.allow(a, t0 + Duration::from_secs(61)));
    }
}
