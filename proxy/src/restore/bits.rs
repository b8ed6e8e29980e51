//! A fixed-length bitset (one bit per chunk or overlay block).

/// `len` bits, all clear at first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Bits {
    words: Vec<u64>,
    len: u64,
}

impl Bits {
    pub(crate) fn new(len: u64) -> Self {
        Bits {
            words: vec![0; len.div_ceil(64) as usize],
            len,
        }
    }

    pub(crate) fn get(&self, i: u64) -> bool {
        i < self.len && self.words[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    pub(crate) fn set(&mut self, i: u64, on: bool) {
        if i >= self.len {
            return;
        }
        let w = &mut self.words[(i / 64) as usize];
        if on {
            *w |= 1 << (i % 64);
        } else {
            *w &= !(1 << (i % 64));
        }
    }

    /// Sets every bit set in `other` (bits past this set's length are ignored).
    pub(crate) fn union_with(&mut self, other: &Bits) {
        for (w, o) in self.words.iter_mut().zip(&other.words) {
            *w |= o;
        }
        if let Some(last) = self.words.last_mut() {
            let tail = self.len % 64;
            if tail != 0 {
                *last &= (1u64 << tail) - 1;
            }
        }
    }

    pub(crate) fn count(&self) -> u64 {
        self.words.iter().map(|w| w.count_ones() as u64).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_get_count() {
        let mut b = Bits::new(130);
        for i in [0, 63, 64, 129] {
            b.set(i, true);
        }
        b.set(500, true);
        assert!(b.get(63) && b.get(64) && !b.get(65) && !b.get(500));
        assert_eq!(b.count(), 4);
        b.set(64, false);
        assert_eq!(b.count(), 3);
    }

    #[test]
    fn union_keeps_length() {
        let mut a = Bits::new(70);
        a.set(1, true);
        let mut b = Bits::new(130);
        for i in [2, 69, 100] {
            b.set(i, true);
        }
        a.union_with(&b);
        assert!(a.get(1) && a.get(2) && a.get(69) && !a.get(100));
        assert_eq!(a.count(), 3);
    }
}
