//! The agent's one way to take a lock.

use std::sync::{Mutex, MutexGuard};

/// A panic while holding one of the agent's locks leaves consistent data (every update is
/// a single call); carry on rather than wedge the agent.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
