//! A small least-recently-used map for the readers' and the writer's bounded caches (index
//! blocks, decompressed chunks). Eviction scans every entry, so keep capacities small.

use std::collections::HashMap;
use std::hash::Hash;

/// A map of at most `cap` entries that drops the least recently used one when full.
pub(crate) struct Lru<K, V> {
    cap: usize,
    tick: u64,
    map: HashMap<K, (V, u64)>,
}

impl<K: Hash + Eq + Copy, V: Clone> Lru<K, V> {
    /// An empty map holding at most `cap` entries (0: holds nothing).
    pub(crate) fn new(cap: usize) -> Self {
        Lru {
            cap,
            tick: 0,
            map: HashMap::new(),
        }
    }

    /// The value of `k`, marked as just used.
    pub(crate) fn get(&mut self, k: &K) -> Option<V> {
        self.tick += 1;
        let t = self.tick;
        self.map.get_mut(k).map(|(v, at)| {
            *at = t;
            v.clone()
        })
    }

    /// Insert `k`, dropping the least recently used entry if the map is full.
    pub(crate) fn put(&mut self, k: K, v: V) {
        if self.cap == 0 {
            return;
        }
        if self.map.len() >= self.cap && !self.map.contains_key(&k) {
            let oldest = self
                .map
                .iter()
                .min_by_key(|(_, (_, t))| *t)
                .map(|(k, _)| *k);
            if let Some(k) = oldest {
                self.map.remove(&k);
            }
        }
        self.tick += 1;
        self.map.insert(k, (v, self.tick));
    }
}

#[cfg(test)]
mod tests {
    use super::Lru;

    #[test]
    fn drops_the_least_recently_used() {
        let mut l = Lru::new(2);
        l.put(1, "a");
        l.put(2, "b");
        assert_eq!(l.get(&1), Some("a"));
        l.put(3, "c");
        assert_eq!(l.get(&2), None, "2 was used least recently");
        assert_eq!((l.get(&1), l.get(&3)), (Some("a"), Some("c")));
        let mut none = Lru::new(0);
        none.put(1, 1);
        assert_eq!(none.get(&1), None);
    }
}
