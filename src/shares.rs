//! At most N of something per key at once: answers per account (`admission`), password checks
//! per client address (`passwords`). A `Share` counts while it lives.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

/// Counts per key (cheap to clone). A plain mutex over a small map: held for a few
/// instructions, never across an await.
#[derive(Clone)]
pub struct Shares<K: Eq + Hash + Copy> {
    limit: usize,
    counts: Arc<Mutex<HashMap<K, usize>>>,
}

/// One counted share of `key`; dropping it gives it back.
pub struct Share<K: Eq + Hash + Copy> {
    key: K,
    counts: Arc<Mutex<HashMap<K, usize>>>,
}

impl<K: Eq + Hash + Copy> Shares<K> {
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            counts: Arc::default(),
        }
    }

    /// A share of `key`, unless it has `limit` already.
    pub fn try_take(&self, key: K) -> Option<Share<K>> {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let n = counts.entry(key).or_insert(0);
        if *n >= self.limit {
            return None;
        }
        *n += 1;
        Some(Share {
            key,
            counts: self.counts.clone(),
        })
    }

    /// Shares of `key` now.
    pub fn held(&self, key: K) -> usize {
        let counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        counts.get(&key).copied().unwrap_or(0)
    }
}

impl<K: Eq + Hash + Copy> Drop for Share<K> {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = counts.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_gets_its_limit_and_no_more_until_one_is_given_back() {
        let s = Shares::new(2);
        let a = s.try_take(1).unwrap();
        let _b = s.try_take(1).unwrap();
        assert!(s.try_take(1).is_none());
        assert!(s.try_take(2).is_some(), "other keys are not affected");
        drop(a);
        assert_eq!(s.held(1), 1);
        assert!(s.try_take(1).is_some());
        assert_eq!(s.held(3), 0);
    }
}
