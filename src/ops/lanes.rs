//! Eight f32 (and u32) lanes for the hand-blocked kernels: the low-rank adapter products, the
//! dropout hash, transposed tiles. LLVM does not reliably vectorize the same code written over
//! `[f32; 8]` (measured: scalar `vfmadd231ss` with stack spills, 5–8× slower), and Rust never
//! contracts `a * b + c` into a fused multiply-add, so the operations are spelled out once here:
//! AVX2 + FMA where the build has them (the crate builds with `target-cpu=native`), portable
//! arrays otherwise.

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
mod imp {
    use std::arch::x86_64::*;

    pub type F = __m256;
    pub type U = __m256i;

    // SAFETY (every function below): AVX2 and FMA are enabled for the whole build, so the
    // intrinsics are available; loads and stores go through pointers whose 8-element extent
    // the public wrappers check.
    #[inline(always)]
    pub fn splat(v: f32) -> F {
        unsafe { _mm256_set1_ps(v) }
    }
    #[inline(always)]
    pub unsafe fn load(p: *const f32) -> F {
        _mm256_loadu_ps(p)
    }
    #[inline(always)]
    pub unsafe fn store(p: *mut f32, v: F) {
        _mm256_storeu_ps(p, v)
    }
    #[inline(always)]
    pub fn fma(acc: F, a: F, b: F) -> F {
        unsafe { _mm256_fmadd_ps(a, b, acc) }
    }
    #[inline(always)]
    pub fn mul(a: F, b: F) -> F {
        unsafe { _mm256_mul_ps(a, b) }
    }
    #[inline(always)]
    pub fn add(a: F, b: F) -> F {
        unsafe { _mm256_add_ps(a, b) }
    }
    #[inline(always)]
    pub fn to_array(v: F) -> [f32; 8] {
        let mut a = [0f32; 8];
        unsafe { _mm256_storeu_ps(a.as_mut_ptr(), v) };
        a
    }
    #[inline(always)]
    pub fn from_array(a: [f32; 8]) -> F {
        unsafe { _mm256_loadu_ps(a.as_ptr()) }
    }
    #[inline(always)]
    pub fn usplat(v: u32) -> U {
        unsafe { _mm256_set1_epi32(v as i32) }
    }
    #[inline(always)]
    pub fn iota(base: u32) -> U {
        unsafe { _mm256_add_epi32(usplat(base), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)) }
    }
    #[inline(always)]
    pub fn uadd(a: U, b: U) -> U {
        unsafe { _mm256_add_epi32(a, b) }
    }
    #[inline(always)]
    pub fn umul(a: U, b: U) -> U {
        unsafe { _mm256_mullo_epi32(a, b) }
    }
    #[inline(always)]
    pub fn uxor(a: U, b: U) -> U {
        unsafe { _mm256_xor_si256(a, b) }
    }
    #[inline(always)]
    pub fn ushr<const N: i32>(a: U) -> U {
        unsafe { _mm256_srli_epi32::<N>(a) }
    }
    /// `v` where `a ≥ th` (unsigned), else 0.
    #[inline(always)]
    pub fn select_ge(a: U, th: u32, v: f32) -> F {
        unsafe {
            let ge = _mm256_cmpeq_epi32(_mm256_max_epu32(a, usplat(th)), a);
            _mm256_and_ps(_mm256_castsi256_ps(ge), splat(v))
        }
    }
    /// Bit `l` set where lane `l` of `a` is below `th` (unsigned).
    #[inline(always)]
    pub fn lt_bits(a: U, th: u32) -> u8 {
        unsafe {
            let ge = _mm256_cmpeq_epi32(_mm256_max_epu32(a, usplat(th)), a);
            !(_mm256_movemask_ps(_mm256_castsi256_ps(ge)) as u8)
        }
    }
    /// 8×8 transpose: lane `i` of output `j` is lane `j` of input `i`.
    #[inline(always)]
    pub fn transpose(r: [F; 8]) -> [F; 8] {
        unsafe {
            let t0 = _mm256_unpacklo_ps(r[0], r[1]);
            let t1 = _mm256_unpackhi_ps(r[0], r[1]);
            let t2 = _mm256_unpacklo_ps(r[2], r[3]);
            let t3 = _mm256_unpackhi_ps(r[2], r[3]);
            let t4 = _mm256_unpacklo_ps(r[4], r[5]);
            let t5 = _mm256_unpackhi_ps(r[4], r[5]);
            let t6 = _mm256_unpacklo_ps(r[6], r[7]);
            let t7 = _mm256_unpackhi_ps(r[6], r[7]);
            let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
            let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
            let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
            let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
            let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
            let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
            let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
            let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
            [
                _mm256_permute2f128_ps::<0x20>(u0, u4),
                _mm256_permute2f128_ps::<0x20>(u1, u5),
                _mm256_permute2f128_ps::<0x20>(u2, u6),
                _mm256_permute2f128_ps::<0x20>(u3, u7),
                _mm256_permute2f128_ps::<0x31>(u0, u4),
                _mm256_permute2f128_ps::<0x31>(u1, u5),
                _mm256_permute2f128_ps::<0x31>(u2, u6),
                _mm256_permute2f128_ps::<0x31>(u3, u7),
            ]
        }
    }
}

#[cfg(not(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
)))]
mod imp {
    pub type F = [f32; 8];
    pub type U = [u32; 8];

    #[inline(always)]
    pub fn splat(v: f32) -> F {
        [v; 8]
    }
    #[inline(always)]
    pub unsafe fn load(p: *const f32) -> F {
        std::array::from_fn(|i| *p.add(i))
    }
    #[inline(always)]
    pub unsafe fn store(p: *mut f32, v: F) {
        for (i, x) in v.into_iter().enumerate() {
            *p.add(i) = x;
        }
    }
    #[inline(always)]
    pub fn fma(acc: F, a: F, b: F) -> F {
        std::array::from_fn(|i| a[i].mul_add(b[i], acc[i]))
    }
    #[inline(always)]
    pub fn mul(a: F, b: F) -> F {
        std::array::from_fn(|i| a[i] * b[i])
    }
    #[inline(always)]
    pub fn add(a: F, b: F) -> F {
        std::array::from_fn(|i| a[i] + b[i])
    }
    #[inline(always)]
    pub fn to_array(v: F) -> [f32; 8] {
        v
    }
    #[inline(always)]
    pub fn from_array(a: [f32; 8]) -> F {
        a
    }
    #[inline(always)]
    pub fn usplat(v: u32) -> U {
        [v; 8]
    }
    #[inline(always)]
    pub fn iota(base: u32) -> U {
        std::array::from_fn(|i| base.wrapping_add(i as u32))
    }
    #[inline(always)]
    pub fn uadd(a: U, b: U) -> U {
        std::array::from_fn(|i| a[i].wrapping_add(b[i]))
    }
    #[inline(always)]
    pub fn umul(a: U, b: U) -> U {
        std::array::from_fn(|i| a[i].wrapping_mul(b[i]))
    }
    #[inline(always)]
    pub fn uxor(a: U, b: U) -> U {
        std::array::from_fn(|i| a[i] ^ b[i])
    }
    #[inline(always)]
    pub fn ushr<const N: i32>(a: U) -> U {
        a.map(|v| v >> N)
    }
    #[inline(always)]
    pub fn select_ge(a: U, th: u32, v: f32) -> F {
        a.map(|x| if x >= th { v } else { 0.0 })
    }
    #[inline(always)]
    pub fn lt_bits(a: U, th: u32) -> u8 {
        a.iter()
            .enumerate()
            .fold(0, |m, (l, &x)| m | u8::from(x < th) << l)
    }
    #[inline(always)]
    pub fn transpose(r: [F; 8]) -> [F; 8] {
        std::array::from_fn(|j| std::array::from_fn(|i| r[i][j]))
    }
}

/// Asks for the cache line holding `p` to be brought into L1 ahead of its use. A hint: it never
/// faults, so `p` may lie past the end of the data (form it with `wrapping_add`). The hand-walked
/// kernels that stride down rows (the low-rank input side) run out of the hardware prefetchers'
/// reach and wait on memory without it.
#[inline(always)]
pub fn prefetch(p: *const f32) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint that does not access memory architecturally: any address is
    // allowed and none faults.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast())
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Eight f32 lanes.
#[derive(Clone, Copy)]
pub struct F8(imp::F);

/// Eight u32 lanes (wrapping arithmetic).
#[derive(Clone, Copy)]
pub struct U8(imp::U);

impl F8 {
    /// All lanes 0.
    #[inline(always)]
    pub fn zero() -> F8 {
        F8(imp::splat(0.0))
    }
    /// All lanes `v`.
    #[inline(always)]
    pub fn splat(v: f32) -> F8 {
        F8(imp::splat(v))
    }
    /// `s[..8]`.
    #[inline(always)]
    pub fn load(s: &[f32]) -> F8 {
        assert!(s.len() >= 8, "F8::load: {} elements", s.len());
        // SAFETY: 8 readable elements checked above.
        F8(unsafe { imp::load(s.as_ptr()) })
    }
    /// Eight lanes from `p`.
    ///
    /// # Safety
    /// `p..p + 8` must be readable (hot loops check their extents once, up front).
    #[inline(always)]
    pub unsafe fn load_ptr(p: *const f32) -> F8 {
        F8(imp::load(p))
    }
    /// Writes the lanes to `p..p + 8`.
    ///
    /// # Safety
    /// `p..p + 8` must be writable and not aliased.
    #[inline(always)]
    pub unsafe fn store_ptr(self, p: *mut f32) {
        imp::store(p, self.0)
    }
    /// `s[..w]` and zeros beyond (`w ≤ 8`).
    #[inline(always)]
    pub fn load_partial(s: &[f32], w: usize) -> F8 {
        if w == 8 {
            return F8::load(s);
        }
        let mut a = [0f32; 8];
        a[..w].copy_from_slice(&s[..w]);
        F8(imp::from_array(a))
    }
    /// Writes the lanes to `d[..8]`.
    #[inline(always)]
    pub fn store(self, d: &mut [f32]) {
        assert!(d.len() >= 8, "F8::store: {} elements", d.len());
        // SAFETY: 8 writable elements checked above.
        unsafe { imp::store(d.as_mut_ptr(), self.0) }
    }
    /// `d[..w] += lanes[..w]` (`w ≤ 8`).
    #[inline(always)]
    pub fn add_to(self, d: &mut [f32], w: usize) {
        if w == 8 {
            F8(imp::add(F8::load(d).0, self.0)).store(d);
        } else {
            let a = imp::to_array(self.0);
            d[..w].iter_mut().zip(a).for_each(|(x, v)| *x += v);
        }
    }
    /// `self + a ⊙ b`, fused.
    #[inline(always)]
    pub fn fma(self, a: F8, b: F8) -> F8 {
        F8(imp::fma(self.0, a.0, b.0))
    }
    /// Sum of the lanes.
    #[inline(always)]
    pub fn sum(self) -> f32 {
        imp::to_array(self.0).iter().sum()
    }
    /// The lanes.
    #[inline(always)]
    pub fn to_array(self) -> [f32; 8] {
        imp::to_array(self.0)
    }
    /// 8×8 transpose of eight rows.
    #[inline(always)]
    pub fn transpose(r: [F8; 8]) -> [F8; 8] {
        imp::transpose(r.map(|v| v.0)).map(F8)
    }
}

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
impl F8 {
    /// From an AVX register (kernels with their own intrinsics, e.g. 4-bit decoding).
    #[inline(always)]
    pub fn from_m256(v: std::arch::x86_64::__m256) -> F8 {
        F8(v)
    }
}

impl U8 {
    /// All lanes `v`.
    #[inline(always)]
    pub fn splat(v: u32) -> U8 {
        U8(imp::usplat(v))
    }
    /// `base, base + 1, …, base + 7`.
    #[inline(always)]
    pub fn iota(base: u32) -> U8 {
        U8(imp::iota(base))
    }
    /// `self >> N`.
    #[inline(always)]
    pub fn shr<const N: i32>(self) -> U8 {
        U8(imp::ushr::<N>(self.0))
    }
    /// `v` in lanes where `self ≥ th` (unsigned), 0 elsewhere.
    #[inline(always)]
    pub fn select_ge(self, th: u32, v: f32) -> F8 {
        F8(imp::select_ge(self.0, th, v))
    }
    /// Bit `l` set where lane `l` is below `th` (unsigned).
    #[inline(always)]
    pub fn lt_bits(self, th: u32) -> u8 {
        imp::lt_bits(self.0, th)
    }
}

/// Lane-wise product.
impl std::ops::Mul for F8 {
    type Output = F8;
    #[inline(always)]
    fn mul(self, b: F8) -> F8 {
        F8(imp::mul(self.0, b.0))
    }
}

/// Lane-wise wrapping sum.
impl std::ops::Add for U8 {
    type Output = U8;
    #[inline(always)]
    fn add(self, b: U8) -> U8 {
        U8(imp::uadd(self.0, b.0))
    }
}

/// Lane-wise wrapping product (low 32 bits).
impl std::ops::Mul for U8 {
    type Output = U8;
    #[inline(always)]
    fn mul(self, b: U8) -> U8 {
        U8(imp::umul(self.0, b.0))
    }
}

/// Lane-wise exclusive or.
impl std::ops::BitXor for U8 {
    type Output = U8;
    #[inline(always)]
    fn bitxor(self, b: U8) -> U8 {
        U8(imp::uxor(self.0, b.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lanes_match_scalar_arithmetic() {
        let a: Vec<f32> = (0..8).map(|i| i as f32 - 2.5).collect();
        let b: Vec<f32> = (0..8).map(|i| 0.25 * i as f32).collect();
        let (fa, fb) = (F8::load(&a), F8::load(&b));
        let got = F8::splat(1.0).fma(fa, fb).to_array();
        for i in 0..8 {
            assert_eq!(got[i], a[i].mul_add(b[i], 1.0));
        }
        assert_eq!((fa * fb).sum(), (0..8).map(|i| a[i] * b[i]).sum::<f32>());
        let mut d = vec![1f32; 8];
        fa.add_to(&mut d, 3);
        assert_eq!(d[..4], [a[0] + 1.0, a[1] + 1.0, a[2] + 1.0, 1.0]);
        assert_eq!(F8::load_partial(&a, 2).to_array()[..3], [a[0], a[1], 0.0]);
        let rows: [F8; 8] =
            std::array::from_fn(|i| F8::splat(i as f32).fma(F8::load(&b), F8::splat(1.0)));
        let t = F8::transpose(rows);
        for (j, col) in t.iter().enumerate() {
            for (i, v) in col.to_array().into_iter().enumerate() {
                assert_eq!(v, rows[i].to_array()[j]);
            }
        }
        let h = ((U8::iota(u32::MAX - 3) * U8::splat(3)) ^ U8::splat(5)).shr::<1>();
        let want: Vec<u32> = (0..8u32)
            .map(|i| ((u32::MAX - 3).wrapping_add(i).wrapping_mul(3) ^ 5) >> 1)
            .collect();
        let sel = h.select_ge(want[4], 2.0).to_array();
        for i in 0..8 {
            assert_eq!(sel[i], if want[i] >= want[4] { 2.0 } else { 0.0 });
        }
    }
}
