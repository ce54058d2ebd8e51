//! What a session's recording may take: its own budget (bytes in all, bytes per second,
//! from its profile) and its share of the spool, which no session may push past
//! `spool.max_bytes`. Checked before every write, so a session that floods its
//! terminal meets the limit while it floods, not at its next login.

use crate::sync::lock;
use serde::Deserialize;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A profile's `[recording]` section.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RecordingLimits {
    /// Bytes one session's recording may take on disk (cast and audit stream).
    pub max_bytes: u64,
    /// Bytes per second the recording may grow by; past it the session's output is
    /// slowed down (its terminal is read more slowly), not dropped. 0: no limit.
    pub max_bytes_per_sec: u64,
    /// What happens when `max_bytes` or the spool's limit is reached.
    pub at_limit: AtLimit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AtLimit {
    /// The session is closed, with the reason on its terminal and in the recording.
    End,
    /// The session goes on unrecorded from there; the cast and its metadata say where
    /// and why it was cut.
    Truncate,
}

impl Default for RecordingLimits {
    fn default() -> Self {
        RecordingLimits {
            max_bytes: 1 << 30,
            max_bytes_per_sec: 0,
            at_limit: AtLimit::End,
        }
    }
}

/// Why a write was not let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exhausted {
    Session { max_bytes: u64 },
    Spool { max_bytes: u64 },
}

impl std::fmt::Display for Exhausted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exhausted::Session { max_bytes } => {
                write!(f, "the session's recording reached its limit of {max_bytes} bytes")
            }
            Exhausted::Spool { max_bytes } => write!(
                f,
                "the recording spool reached its limit of {max_bytes} bytes (recordings are not leaving the host)"
            ),
        }
    }
}

/// The spool's size, known without walking the directory on every write: the last
/// walk plus every byte reserved since. Re-walked every second (the shipper frees room).
pub struct SpoolMeter {
    dir: PathBuf,
    max_bytes: u64,
    walked: AtomicU64,
    since_walk: AtomicU64,
}

impl SpoolMeter {
    pub fn new(dir: PathBuf, max_bytes: u64) -> Arc<SpoolMeter> {
        let meter = Arc::new(SpoolMeter {
            dir,
            max_bytes,
            walked: AtomicU64::new(0),
            since_walk: AtomicU64::new(0),
        });
        meter.rewalk();
        meter
    }

    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    pub fn used(&self) -> u64 {
        self.walked.load(Ordering::SeqCst) + self.since_walk.load(Ordering::SeqCst)
    }

    /// Measures the spool again.
    pub fn rewalk(&self) {
        // Bytes reserved while walking may be counted twice until the next walk: the
        // meter errs on the full side.
        let reserved = self.since_walk.load(Ordering::SeqCst);
        let size = crate::ship::spool_bytes(&self.dir);
        self.walked.store(size, Ordering::SeqCst);
        self.since_walk.fetch_sub(reserved, Ordering::SeqCst);
    }

    /// Takes room for `bytes`, or says the spool is full.
    fn reserve(&self, bytes: u64) -> Result<(), Exhausted> {
        let mut current = self.since_walk.load(Ordering::SeqCst);
        loop {
            let used = self.walked.load(Ordering::SeqCst) + current;
            if used + bytes > self.max_bytes {
                return Err(Exhausted::Spool {
                    max_bytes: self.max_bytes,
                });
            }
            match self.since_walk.compare_exchange(
                current,
                current + bytes,
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(_) => return Ok(()),
                Err(now) => current = now,
            }
        }
    }

    /// Gives back what a reservation did not use.
    fn release(&self, bytes: u64) {
        let _ = self
            .since_walk
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| {
                Some(v.saturating_sub(bytes))
            });
    }
}

/// One session's budget.
pub struct RecordingBudget {
    limits: RecordingLimits,
    spool: Arc<SpoolMeter>,
    state: Mutex<BudgetState>,
}

struct BudgetState {
    used: u64,
    /// Token bucket for the rate: bytes that may be written now.
    tokens: f64,
    refilled: Instant,
}

/// Room taken before a write: at most what the write can take, settled after it with
/// what it did take.
pub struct Reservation {
    bytes: u64,
}

impl RecordingBudget {
    pub fn new(limits: RecordingLimits, spool: Arc<SpoolMeter>) -> RecordingBudget {
        let tokens = limits.max_bytes_per_sec as f64;
        RecordingBudget {
            limits,
            spool,
            state: Mutex::new(BudgetState {
                used: 0,
                tokens,
                refilled: Instant::now(),
            }),
        }
    }

    pub fn limits(&self) -> &RecordingLimits {
        &self.limits
    }

    pub fn used(&self) -> u64 {
        lock(&self.state).used
    }

    /// Room for a write of at most `bytes`.
    pub fn reserve(&self, bytes: u64) -> Result<Reservation, Exhausted> {
        let state = lock(&self.state);
        if state.used + bytes > self.limits.max_bytes {
            return Err(Exhausted::Session {
                max_bytes: self.limits.max_bytes,
            });
        }
        self.spool.reserve(bytes)?;
        Ok(Reservation { bytes })
    }

    /// Room for a write of at most `bytes` that only the spool bounds (audit lines).
    pub fn reserve_spool(&self, bytes: u64) -> Result<Reservation, Exhausted> {
        self.spool.reserve(bytes)?;
        Ok(Reservation { bytes })
    }

    /// Settles a reservation with what the write took on disk.
    pub fn settle(&self, reservation: Reservation, written: u64) {
        let unused = reservation.bytes.saturating_sub(written);
        self.spool.release(unused);
        let mut state = lock(&self.state);
        state.used += written;
        if self.limits.max_bytes_per_sec > 0 {
            state.tokens -= written as f64;
        }
    }

    /// How long the session's output should wait before more is read, to keep the
    /// recording under its rate.
    pub fn pause(&self) -> Option<Duration> {
        let rate = self.limits.max_bytes_per_sec as f64;
        if rate <= 0.0 {
            return None;
        }
        let mut state = lock(&self.state);
        let now = Instant::now();
        let elapsed = now.duration_since(state.refilled).as_secs_f64();
        state.refilled = now;
        // At most one second's worth saved up: a burst, not a reserve.
        state.tokens = (state.tokens + elapsed * rate).min(rate);
        (state.tokens < 0.0).then(|| Duration::from_secs_f64(-state.tokens / rate))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meter(max: u64) -> (Arc<SpoolMeter>, PathBuf) {
        let dir = std::env::temp_dir().join(format!(
            "usher-budget-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("old.cast"), vec![b'x'; 1000]).unwrap();
        (SpoolMeter::new(dir.clone(), max), dir)
    }

    #[test]
    fn the_spool_limit_holds_across_sessions() {
        let (spool, dir) = meter(5000);
        assert_eq!(spool.used(), 1000);
        let limits = RecordingLimits::default();
        let a = RecordingBudget::new(limits.clone(), spool.clone());
        let b = RecordingBudget::new(limits, spool.clone());
        let r = a.reserve(3000).unwrap();
        assert_eq!(
            b.reserve(1500).err(),
            Some(Exhausted::Spool { max_bytes: 5000 })
        );
        a.settle(r, 1000);
        let r = b.reserve(1500).unwrap();
        b.settle(r, 1500);
        assert_eq!(spool.used(), 3500);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_session_stops_at_its_own_limit() {
        let (spool, dir) = meter(1 << 30);
        let limits = RecordingLimits {
            max_bytes: 2048,
            ..Default::default()
        };
        let a = RecordingBudget::new(limits, spool);
        let r = a.reserve(2000).unwrap();
        a.settle(r, 2000);
        assert_eq!(
            a.reserve(100).err(),
            Some(Exhausted::Session { max_bytes: 2048 })
        );
        assert!(a.reserve(48).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_rate_slows_output_down() {
        let (spool, dir) = meter(1 << 30);
        let limits = RecordingLimits {
            max_bytes_per_sec: 1000,
            ..Default::default()
        };
        let a = RecordingBudget::new(limits, spool);
        assert_eq!(a.pause(), None);
        let r = a.reserve(3000).unwrap();
        a.settle(r, 3000);
        let p = a.pause().unwrap();
        assert!(
            p > Duration::from_millis(1900) && p <= Duration::from_secs(2),
            "{p:?}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
