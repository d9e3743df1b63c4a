//! Scalar math the kernels share, written so loops over slices vectorize: `exp` for
//! non-positive arguments, the sigmoid, softmax with replayable statistics, dot products and
//! sums with independent accumulators.

/// `a·b + c`, fused into one rounding where the build has FMA (one instruction, and loops over
/// it still vectorize); a plain multiply and add elsewhere, where `mul_add` would be a libm call.
#[inline(always)]
pub fn fmadd(a: f32, b: f32, c: f32) -> f32 {
    #[cfg(target_feature = "fma")]
    {
        a.mul_add(b, c)
    }
    #[cfg(not(target_feature = "fma"))]
    {
        a * b + c
    }
}

/// `exp(x)` for `x <= 0` with relative error below 3e-7 (Cephes-style range reduction and a
/// degree-6 polynomial), written without branches so loops over slices vectorize. Inputs below
/// -87 return 0-ish (no denormals); NaN stays NaN.
#[inline(always)]
pub fn exp_neg(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Not `max`: a NaN input must stay NaN (a diverged run has to show in the loss).
    let x = if x < -87.0 { -87.0 } else { x };
    // Round to nearest with the 1.5·2²³ trick: no libm call, so the loop vectorizes.
    const MAGIC: f32 = 12_582_912.0;
    let shifted = fmadd(x, LOG2E, MAGIC);
    let n = shifted - MAGIC;
    let r = fmadd(-n, LN2_LO, fmadd(-n, LN2_HI, x));
    let p = 1.987_569_1e-4f32;
    let p = fmadd(p, r, 1.398_199_9e-3);
    let p = fmadd(p, r, 8.333_452e-3);
    let p = fmadd(p, r, 4.166_579_6e-2);
    let p = fmadd(p, r, 0.166_666_66);
    let p = fmadd(p, r, 0.5);
    let p = fmadd(p * r, r, r + 1.0);
    // 2ⁿ from the integer the rounding left in `shifted`'s low mantissa bits, not from
    // `n as i32`: that saturating conversion kept LLVM from vectorizing the callers' loops
    // (2.5× slower; the same bits for every input).
    let ni = (shifted.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    let bits = (ni.wrapping_add(127) as u32) << 23;
    p * f32::from_bits(bits)
}

/// In-place softmax of `row * scale` (max-subtracted), the fast path of attention. Returns
/// the row's statistics `[max·scale, 1/Σ]`, from which [`softmax_replay`] rebuilds the same
/// probabilities from the same scores.
pub fn softmax_scaled(row: &mut [f32], scale: f32) -> [f32; 2] {
    let mx = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) * scale;
    for v in row.iter_mut() {
        *v = exp_neg(*v * scale - mx);
    }
    let inv = 1.0 / sum(row);
    for v in row.iter_mut() {
        *v *= inv;
    }
    [mx, inv]
}

/// Softmax of `row * scale` from statistics [`softmax_scaled`] returned for the same scores:
/// the same operations in the same order, so the probabilities are the same to the bit.
/// Attention's backward recomputes its probabilities this way instead of keeping them.
pub fn softmax_replay(row: &mut [f32], scale: f32, [mx, inv]: [f32; 2]) {
    for v in row.iter_mut() {
        *v = exp_neg(*v * scale - mx) * inv;
    }
}

/// Dot product with 8 independent accumulators (vectorizes; float sums otherwise run serially).
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// `σ(x) = 1/(1 + e^{−x})`, branch-free through [`exp_neg`] so loops vectorize.
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    let e = exp_neg(-x.abs());
    let inv = 1.0 / (1.0 + e);
    if x >= 0.0 {
        inv
    } else {
        e * inv
    }
}

/// Sum with 8 independent accumulators.
#[inline]
pub fn sum(a: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let c = a.chunks_exact(8);
    let r = c.remainder();
    for x in c {
        for k in 0..8 {
            acc[k] += x[k];
        }
    }
    acc.iter().sum::<f32>() + r.iter().sum::<f32>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::Rng;

    /// Attention's backward rebuilds its probabilities from the saved statistics: they must
    /// be the forward's to the bit, including rows with a large spread.
    #[test]
    fn softmax_replay_rebuilds_the_same_probabilities() {
        let mut rng = Rng::new(8);
        for len in [1, 7, 64, 255] {
            let scores: Vec<f32> = (0..len).map(|_| rng.normal() * 30.0).collect();
            let mut fresh = scores.clone();
            let stats = softmax_scaled(&mut fresh, 0.125);
            let mut replay = scores.clone();
            softmax_replay(&mut replay, 0.125, stats);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&fresh), bits(&replay), "length {len}");
            assert!((sum(&fresh) - 1.0).abs() < 1e-5);
        }
    }

    #[test]
    fn exp_neg_is_accurate() {
        let mut worst = 0f64;
        for i in 0..100_000 {
            let x = -(i as f32) * 8.7e-4;
            let e = (x as f64).exp();
            let rel = ((exp_neg(x) as f64) - e).abs() / e;
            worst = worst.max(rel);
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(exp_neg(0.0), 1.0);
        assert!(exp_neg(f32::NAN).is_nan());
        // the clamp: far below -87 gives exp(-87), a normal number, not garbage exponent bits
        assert_eq!(exp_neg(-1e30).to_bits(), exp_neg(-87.0).to_bits());
        assert!(exp_neg(-87.0).is_normal());
    }
}
