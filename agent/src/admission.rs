//! Admission of peers that have not proved anything yet: a network peer before it
//! authenticates, a local process on the console or control socket before it is known.
//! Each holds a slot counted globally and per key (source address, UID); a peer over
//! either cap is turned away at once, so no one peer can use up what others need.

use crate::sync::lock;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

pub struct Admission<K: Eq + Hash + Clone> {
    max_total: usize,
    max_per_key: usize,
    held: Mutex<Held<K>>,
}

struct Held<K> {
    total: usize,
    per_key: HashMap<K, usize>,
}

/// Why a peer was turned away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Every slot is taken.
    Full,
    /// This key holds all the slots one key may hold.
    KeyFull,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Refused::Full => "too many connections waiting to authenticate",
            Refused::KeyFull => "too many connections from this peer",
        })
    }
}

/// A held slot; dropping it gives the slot back.
pub struct Slot<K: Eq + Hash + Clone> {
    admission: Arc<Admission<K>>,
    key: K,
}

impl<K: Eq + Hash + Clone> Admission<K> {
    pub fn new(max_total: usize, max_per_key: usize) -> Arc<Self> {
        Arc::new(Admission {
            max_total,
            max_per_key,
            held: Mutex::new(Held {
                total: 0,
                per_key: HashMap::new(),
            }),
        })
    }

    pub fn try_admit(self: &Arc<Self>, key: K) -> Result<Slot<K>, Refused> {
        let mut held = lock(&self.held);
        if held.total >= self.max_total {
            return Err(Refused::Full);
        }
        let n = held.per_key.entry(key.clone()).or_insert(0);
        if *n >= self.max_per_key {
            return Err(Refused::KeyFull);
        }
        *n += 1;
        held.total += 1;
        Ok(Slot {
            admission: self.clone(),
            key,
        })
    }

    pub fn held(&self) -> usize {
        lock(&self.held).total
    }
}

impl<K: Eq + Hash + Clone> Drop for Slot<K> {
    fn drop(&mut self) {
        let mut held = lock(&self.admission.held);
        held.total -= 1;
        if let Some(n) = held.per_key.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                held.per_key.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_per_key_and_in_total_and_gives_slots_back() {
        let a = Admission::new(3, 2);
        let s1 = a.try_admit("x").unwrap();
        let _s2 = a.try_admit("x").unwrap();
        assert_eq!(a.try_admit("x").err(), Some(Refused::KeyFull));
        let _s3 = a.try_admit("y").unwrap();
        assert_eq!(a.try_admit("z").err(), Some(Refused::Full));
        drop(s1);
        assert_eq!(a.held(), 2);
        let _s4 = a.try_admit("x").unwrap();
        assert_eq!(a.held(), 3);
    }
}
