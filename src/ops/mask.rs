//! [`KeepMask`]: a counter-based random keep mask, the kernel under dropout. Element `e` of a
//! call is kept iff a 32-bit hash of `(seed, e)` is at least `p·2³²`, so the mask is a pure
//! function of one seed: never stored (backward and activation checkpointing regenerate it),
//! a few integer operations per element (the hash vectorizes, [`KeepMask::factors8`]), and the
//! same on any thread count.

use super::lanes::{F8, U8};

/// murmur3's 32-bit finalizer: a bijection with full avalanche.
#[inline(always)]
fn fmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85EB_CA6B);
    h ^= h >> 13;
    h = h.wrapping_mul(0xC2B2_AE35);
    h ^ (h >> 16)
}

/// The keep mask of drop probability `p` and one seed, with the factor of kept elements
/// `1/(1−p)` (inverted dropout).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KeepMask {
    k1: u32,
    k2: u32,
    threshold: u32,
    keep_scale: f32,
}

impl KeepMask {
    /// The mask of drop probability `p` (0 ≤ p < 1) drawn from `seed`.
    pub fn new(p: f32, seed: u64) -> Self {
        KeepMask {
            k1: seed as u32,
            k2: (seed >> 32) as u32,
            threshold: (p as f64 * 4_294_967_296.0).round().min(u32::MAX as f64) as u32,
            keep_scale: 1.0 / (1.0 - p),
        }
    }

    /// Factor of kept elements, `1/(1−p)`.
    pub fn keep_scale(&self) -> f32 {
        self.keep_scale
    }

    /// Whether element `e` is kept.
    #[inline(always)]
    pub fn kept(&self, e: usize) -> bool {
        fmix32(fmix32((e as u32).wrapping_add(self.k1)) ^ self.k2) >= self.threshold
    }

    /// `1/(1−p)` for a kept element, 0 for a dropped one.
    #[inline(always)]
    pub fn factor(&self, e: usize) -> f32 {
        if self.kept(e) {
            self.keep_scale
        } else {
            0.0
        }
    }

    /// [`factor`](Self::factor) of elements `e0..e0 + 8`, eight lanes at a time (the same hash).
    #[inline(always)]
    pub fn factors8(&self, e0: usize) -> F8 {
        self.hash8(e0).select_ge(self.threshold, self.keep_scale)
    }

    /// Which of elements `e0..e0 + 8` are dropped: bit `l` for element `e0 + l` (the same
    /// hash; the dropped-element products list them from it).
    #[inline(always)]
    pub fn dropped8(&self, e0: usize) -> u8 {
        self.hash8(e0).lt_bits(self.threshold)
    }

    /// The hash of elements `e0..e0 + 8`, eight lanes at a time.
    #[inline(always)]
    fn hash8(&self, e0: usize) -> U8 {
        let fmix = |h: U8| {
            let h = (h ^ h.shr::<16>()) * U8::splat(0x85EB_CA6B);
            let h = (h ^ h.shr::<13>()) * U8::splat(0xC2B2_AE35);
            h ^ h.shr::<16>()
        };
        let e = U8::iota(e0 as u32) + U8::splat(self.k1);
        fmix(fmix(e) ^ U8::splat(self.k2))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lane_factors_follow_the_mask() {
        let m = KeepMask::new(0.3, 0xfeed_beef_1234);
        for e0 in [0usize, 5, 992] {
            let f = m.factors8(e0).to_array();
            let dropped = m.dropped8(e0);
            for (l, &f) in f.iter().enumerate() {
                assert_eq!(f, m.factor(e0 + l), "element {}", e0 + l);
                assert_eq!(dropped >> l & 1 == 1, !m.kept(e0 + l), "element {}", e0 + l);
            }
        }
        // p = 0 keeps everything, at factor 1
        let all = KeepMask::new(0.0, 7);
        assert!((0..1000).all(|e| all.factor(e) == 1.0));
    }
}
