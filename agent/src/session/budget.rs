//! What a session's recording may take: its own budget (bytes in all, bytes per second,
//! from its profile) and its share of the spool, which no session may push past
//! `spool.max_bytes`. Checked before every write, so a session that floods its
//! terminal meets the limit while it floods, not at its next login.

use crate::sync::lock;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use crate::profile::{AtLimit, RecordingLimits};

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
    /// Reserved minus given back since the last walk; below zero when more was given
    /// back than reserved since (reservations made before the walk, settled after).
    since_walk: AtomicI64,
}

impl SpoolMeter {
    pub fn new(dir: PathBuf, max_bytes: u64) -> Arc<SpoolMeter> {
        let meter = Arc::new(SpoolMeter {
            dir,
            max_bytes,
            walked: AtomicU64::new(0),
            since_walk: AtomicI64::new(0),
        });
        meter.rewalk();
        meter
    }

    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    pub fn used(&self) -> u64 {
        let walked = self.walked.load(Ordering::SeqCst) as i64;
        (walked + self.since_walk.load(Ordering::SeqCst)).max(0) as u64
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

    /// Whether one more write may go in. The write is charged after it is made, at what
    /// it took: the spool can pass its limit by the last write (at most a 32 KiB read,
    /// escaped), never by more.
    fn has_room(&self) -> Result<(), Exhausted> {
        if self.used() >= self.max_bytes {
            return Err(Exhausted::Spool {
                max_bytes: self.max_bytes,
            });
        }
        Ok(())
    }

    fn charge(&self, bytes: u64) {
        self.since_walk.fetch_add(bytes as i64, Ordering::SeqCst);
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

    /// Whether terminal data may be written: the session's budget and the spool both
    /// have room left.
    pub fn admit(&self) -> Result<(), Exhausted> {
        if lock(&self.state).used >= self.limits.max_bytes {
            return Err(Exhausted::Session {
                max_bytes: self.limits.max_bytes,
            });
        }
        self.spool.has_room()
    }

    /// Whether an audit line may be written: only the spool bounds those.
    pub fn admit_audit(&self) -> Result<(), Exhausted> {
        self.spool.has_room()
    }

    /// Counts what a write took on disk.
    pub fn charge(&self, written: u64) {
        self.spool.charge(written);
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
        a.admit().unwrap();
        a.charge(3000);
        b.admit().unwrap();
        b.charge(1500);
        assert_eq!(spool.used(), 5500);
        assert_eq!(a.admit().err(), Some(Exhausted::Spool { max_bytes: 5000 }));
        assert_eq!(
            b.admit_audit().err(),
            Some(Exhausted::Spool { max_bytes: 5000 })
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_walk_while_writing_counts_each_byte_once() {
        let (spool, dir) = meter(1 << 20);
        let a = RecordingBudget::new(RecordingLimits::default(), spool.clone());
        a.charge(100);
        std::fs::write(dir.join("new.cast"), vec![b'x'; 100]).unwrap();
        spool.rewalk();
        assert_eq!(spool.used(), 1100);
        a.charge(50);
        assert_eq!(spool.used(), 1150);
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
        a.admit().unwrap();
        a.charge(2000);
        assert!(a.admit().is_ok());
        a.charge(100);
        assert_eq!(
            a.admit().err(),
            Some(Exhausted::Session { max_bytes: 2048 })
        );
        assert!(a.admit_audit().is_ok());
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
        a.charge(3000);
        let p = a.pause().unwrap();
        assert!(
            p > Duration::from_millis(1900) && p <= Duration::from_secs(2),
            "{p:?}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
