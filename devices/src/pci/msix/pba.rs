//! The MSI-X Pending Bit Array: one bit per vector, vector `v` in bit `v % 64` of
//! little-endian qword `v / 64`, which the guest reads (the spec makes it read-only).
//!
//! A vector that fires while masked (its own mask bit or the function mask) has its bit set
//! and sends nothing; once unmasked, the message goes out and the bit clears. Both the
//! emulated capability ([`super::MsixCap`]) and the passthrough model keep their pending
//! state here.

/// Pending bits for a table of some number of vectors.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pba {
    qwords: Vec<u64>,
    vectors: usize,
}

impl Pba {
    /// All clear, for `vectors` vectors.
    pub fn new(vectors: usize) -> Self {
        Pba {
            qwords: vec![0; vectors.div_ceil(64)],
            vectors,
        }
    }

    /// Bytes the PBA of `vectors` vectors occupies in its BAR.
    pub fn len_for(vectors: usize) -> u64 {
        vectors.div_ceil(64) as u64 * 8
    }

    /// Whether `vector` is pending (false past the table).
    pub fn is_set(&self, vector: usize) -> bool {
        self.qwords
            .get(vector / 64)
            .is_some_and(|q| q & (1 << (vector % 64)) != 0)
    }

    /// Sets or clears `vector`'s bit; a vector past the table is ignored.
    pub fn set(&mut self, vector: usize, pending: bool) {
        if vector >= self.vectors {
            return;
        }
        let q = &mut self.qwords[vector / 64];
        if pending {
            *q |= 1 << (vector % 64);
        } else {
            *q &= !(1 << (vector % 64));
        }
    }

    /// Clears every bit.
    pub fn clear(&mut self) {
        self.qwords.fill(0);
    }

    /// The pending vectors, in order.
    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.vectors).filter(|&v| self.is_set(v))
    }

    /// The vectors whose bits a read of `len` bytes at `offset` (relative to the PBA) shows.
    pub fn vectors_read(&self, offset: u64, len: usize) -> std::ops::Range<usize> {
        let first = usize::try_from(offset.saturating_mul(8)).unwrap_or(usize::MAX);
        let last = first.saturating_add(len.saturating_mul(8));
        first.min(self.vectors)..last.min(self.vectors)
    }

    /// A guest read at `offset` (relative to the PBA); bytes past it read 0.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let at = offset.saturating_add(i as u64);
            *b = usize::try_from(at / 8)
                .ok()
                .and_then(|q| self.qwords.get(q))
                .map_or(0, |q| (q >> (at % 8 * 8)) as u8);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_land_in_little_endian_qwords_and_reads_past_the_end_are_zero() {
        let mut p = Pba::new(70);
        assert_eq!(Pba::len_for(70), 16);
        p.set(65, true);
        p.set(3, true);
        p.set(70, true);
        assert!(!p.is_set(70), "past the table");
        let mut b = [0u8; 24];
        p.read(0, &mut b);
        assert_eq!(b[0], 0x08);
        assert_eq!(b[8], 0x02);
        assert_eq!(b[16..], [0; 8]);
        assert_eq!(p.iter().collect::<Vec<_>>(), [3, 65]);
        p.set(3, false);
        assert_eq!(p.iter().collect::<Vec<_>>(), [65]);
        assert_eq!(p.vectors_read(8, 1), 64..70);
        assert_eq!(p.vectors_read(0, 4), 0..32);
        assert_eq!(p.vectors_read(u64::MAX, 8), 70..70);
        p.clear();
        assert_eq!(p.iter().count(), 0);
    }
}
