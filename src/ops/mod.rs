//! The compute layer under the layers: zero-copy access to candle CPU tensors as `f32` slices,
//! tensor construction from buffers, and strided matrix products through the `gemm` crate
//! (candle's own CPU matmul backend), so that transposed operands never need a copy.
//!
//! Layers pass `candle_core::Tensor`s between each other (the device layer a CUDA backend
//! would plug into) and run their CPU kernels on the slices this module exposes.

use std::mem::MaybeUninit;

use candle_core::{Device, Shape, Storage, Tensor};
use gemm::Parallelism;

pub use candle_core::Result;

pub mod bands;
pub mod lanes;
pub mod transpose;

/// Runs `f` on the contiguous f32 data of `t` without copying (copies only if `t` is strided
/// or not f32).
///
/// # Errors
/// A candle error if `t` is not on the CPU.
pub fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = if t.dtype() != candle_core::DType::F32 {
        t.to_dtype(candle_core::DType::F32)?
    } else {
        t.clone()
    };
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(cpu) => {
            let s = cpu.as_slice::<f32>()?;
            let start = layout.start_offset();
            Ok(f(&s[start..start + layout.shape().elem_count()]))
        }
        _ => Err(candle_core::Error::Msg(
            "qdora's CPU kernels need CPU tensors".into(),
        )),
    }
}

/// Copies the data of `t` into a new `Vec<f32>`.
///
/// # Errors
/// As [`with_f32`].
pub fn to_vec(t: &Tensor) -> Result<Vec<f32>> {
    with_f32(t, |s| s.to_vec())
}

/// Wraps a buffer as a CPU tensor (no copy).
///
/// # Errors
/// If the length does not match the shape.
pub fn tensor<S: Into<Shape>>(data: Vec<f32>, shape: S) -> Result<Tensor> {
    Tensor::from_vec(data, shape, &Device::Cpu)
}

/// `dst (m×n, row stride dst_rs) = [dst +] lhs (m×k) · rhs (k×n)` with arbitrary element
/// strides, through gemm. `threads` > 1 lets gemm split the work itself.
///
/// # Panics
/// If a slice is too short for its shape and strides (a bug in the caller).
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    lhs: &[f32],
    lhs_rs: usize,
    lhs_cs: usize,
    rhs: &[f32],
    rhs_rs: usize,
    rhs_cs: usize,
    threads: usize,
) {
    gemm_scaled(
        m, n, k, dst, dst_rs, accumulate, lhs, lhs_rs, lhs_cs, rhs, rhs_rs, rhs_cs, 1.0, threads,
    );
}

/// [`gemm`] with the product scaled: `dst = [dst +] beta · lhs · rhs`, so that a scalar factor
/// (LoRA's `s`) costs no extra pass over the output.
///
/// # Panics
/// As [`gemm`].
#[allow(clippy::too_many_arguments)]
pub fn gemm_scaled(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    lhs: &[f32],
    lhs_rs: usize,
    lhs_cs: usize,
    rhs: &[f32],
    rhs_rs: usize,
    rhs_cs: usize,
    beta: f32,
    threads: usize,
) {
    // SAFETY: `dst` is a unique borrow of `dst.len()` initialized floats.
    unsafe {
        gemm_raw(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dst.len(),
            dst_rs,
            accumulate,
            lhs,
            lhs_rs,
            lhs_cs,
            rhs,
            rhs_rs,
            rhs_cs,
            beta,
            threads,
        )
    }
}

/// [`gemm`] into memory that need not be initialized: `dst (m×n, row stride dst_rs) = lhs ·
/// rhs`, every element of the `m × n` block written and none read. With [`filled`] it gives a
/// product its output buffer without the zeroing pass `vec![0.0; len]` makes.
///
/// # Panics
/// As [`gemm`].
#[allow(clippy::too_many_arguments)]
pub fn gemm_write(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [MaybeUninit<f32>],
    dst_rs: usize,
    lhs: &[f32],
    lhs_rs: usize,
    lhs_cs: usize,
    rhs: &[f32],
    rhs_rs: usize,
    rhs_cs: usize,
    threads: usize,
) {
    // SAFETY: `dst` is a unique borrow of `dst.len()` floats; with `accumulate` false gemm_raw
    // only writes it.
    unsafe {
        gemm_raw(
            m,
            n,
            k,
            dst.as_mut_ptr().cast(),
            dst.len(),
            dst_rs,
            false,
            lhs,
            lhs_rs,
            lhs_cs,
            rhs,
            rhs_rs,
            rhs_cs,
            1.0,
            threads,
        )
    }
}

/// The product behind [`gemm_scaled`] and [`gemm_write`], on a raw destination.
///
/// # Safety
/// `dst` must be valid for writes of `dst_len` floats, not overlap `lhs` or `rhs`, and hold
/// initialized floats when `accumulate` is set (otherwise it is only written).
///
/// # Panics
/// If `dst_len`, `lhs` or `rhs` is too short for its shape and strides.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_raw(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_len: usize,
    dst_rs: usize,
    accumulate: bool,
    lhs: &[f32],
    lhs_rs: usize,
    lhs_cs: usize,
    rhs: &[f32],
    rhs_rs: usize,
    rhs_cs: usize,
    beta: f32,
    threads: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(dst_len >= (m - 1) * dst_rs + n, "gemm: dst too short");
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    // SAFETY: inside the first `dst_len` floats (asserted above).
                    unsafe { dst.add(i * dst_rs + j).write(0.0) };
                }
            }
        }
        return;
    }
    assert!(
        lhs.len() > (m - 1) * lhs_rs + (k - 1) * lhs_cs,
        "gemm: lhs too short"
    );
    assert!(
        rhs.len() > (k - 1) * rhs_rs + (n - 1) * rhs_cs,
        "gemm: rhs too short"
    );
    let par = if threads <= 1 || m * n * k < 48 * 48 * 48 {
        Parallelism::None
    } else {
        Parallelism::Rayon(threads)
    };
    // SAFETY: `dst`, `lhs` and `rhs` cover every index touched (asserted above; `dst` valid
    // for `dst_len` floats as the caller vouches). gemm reads `dst` only when `accumulate` is
    // set.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            beta,
            false,
            false,
            false,
            par,
        );
    }
}

/// A `len`-float vector that `fill` writes, allocated without the zeroing pass of
/// `vec![0.0; len]`: that pass (calloc's memset of reused heap memory, or the kernel zeroing
/// fresh pages) cost as much as the pass that then overwrote the buffer — ≈ 0.35 s of a 7 s
/// QDoRA step over the layers' outputs and input gradients.
///
/// # Safety
/// `fill` must write every element of the slice it is given before it returns.
pub unsafe fn filled(len: usize, fill: impl FnOnce(&mut [MaybeUninit<f32>])) -> Vec<f32> {
    let mut v = Vec::with_capacity(len);
    fill(&mut v.spare_capacity_mut()[..len]);
    // SAFETY: all `len` elements are initialized (the caller's contract).
    unsafe { v.set_len(len) };
    v
}

/// Two vectors that one `fill` writes together (a kernel with two outputs), allocated as
/// [`filled`] allocates one.
///
/// # Safety
/// `fill` must write every element of both slices it is given before it returns.
pub unsafe fn filled_pair(
    len_a: usize,
    len_b: usize,
    fill: impl FnOnce(&mut [MaybeUninit<f32>], &mut [MaybeUninit<f32>]),
) -> (Vec<f32>, Vec<f32>) {
    let mut b = Vec::new();
    // SAFETY: `fill` writes every element of both (the caller's contract).
    let a = unsafe { filled(len_a, |a| b = filled(len_b, |b| fill(a, b))) };
    (a, b)
}

/// Threads to give one large matrix product (all of rayon's pool).
pub fn threads() -> usize {
    rayon::current_num_threads()
}

/// Largest dense weight (elements) whose forward product takes transposed tiles: up to 8 MiB
/// the tiles stay in cache and beat gemm's own packing (1024² × 1024 tokens: 280–300 against
/// 260–305 GFLOP/s); a larger weight streams from memory twice that way, and lost (32000×1024
/// head × 256 tokens: 197 against 241; 4096² × 256: 202 against 248).
const TILED_MAX_WEIGHT: usize = 1 << 21;

/// `y (n×out) = x (n×in) · wᵀ` for a row-major `w (out×in)`. Products with a weight of at most
/// [`TILED_MAX_WEIGHT`] elements and many rows take transposed tiles of `w` ([`transpose`]);
/// the others go to gemm directly.
pub fn matmul_nt(x: &[f32], n: usize, w: &[f32], out: usize, inp: usize) -> Vec<f32> {
    let tiled = n >= 64 && out >= 256 && out * inp <= TILED_MAX_WEIGHT && transpose::available(inp);
    // SAFETY: either product writes every element of the n × out output.
    unsafe {
        filled(n * out, |y| {
            if tiled {
                transpose::matmul_nt_tiled(x, n, w, out, inp, y);
            } else {
                gemm_write(n, out, inp, y, out, x, inp, 1, w, 1, inp, threads());
            }
        })
    }
}

/// `g (p×q) = aᵀ · b` for `a (n×p)`, `b (n×q)` in a new vector: weight gradients.
pub fn matmul_tn(a: &[f32], p: usize, b: &[f32], q: usize, n: usize) -> Vec<f32> {
    // SAFETY: gemm_write writes every element of the p × q output.
    unsafe {
        filled(p * q, |g| {
            gemm_write(p, q, n, g, q, a, 1, p, b, q, 1, threads())
        })
    }
}

/// `g (p×q) [+]= aᵀ · b` for `a (n×p)`, `b (n×q)`: weight gradients.
pub fn matmul_tn_into(
    a: &[f32],
    p: usize,
    b: &[f32],
    q: usize,
    n: usize,
    g: &mut [f32],
    acc: bool,
) {
    gemm(p, q, n, g, q, acc, a, 1, p, b, q, 1, threads());
}

/// Measures the f32 matmul ceiling of this machine: GFLOP/s of a `size³` product, best of
/// `reps` runs (used by benchmarks as the denominator of MFU).
pub fn matmul_ceiling_gflops(size: usize, reps: usize) -> f64 {
    let a = vec![1.0f32; size * size];
    let b = vec![0.5f32; size * size];
    let mut c = vec![0f32; size * size];
    let mut best = f64::MAX;
    for _ in 0..reps.max(1) {
        let t = std::time::Instant::now();
        gemm(
            size,
            size,
            size,
            &mut c,
            size,
            false,
            &a,
            size,
            1,
            &b,
            size,
            1,
            threads(),
        );
        best = best.min(t.elapsed().as_secs_f64());
    }
    2.0 * (size as f64).powi(3) / best / 1e9
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn products_match_naive() {
        let (n, out, inp) = (5, 7, 3);
        let x: Vec<f32> = (0..n * inp).map(|i| i as f32 * 0.1).collect();
        let w: Vec<f32> = (0..out * inp).map(|i| (i as f32 * 0.7).sin()).collect();
        let y = matmul_nt(&x, n, &w, out, inp);
        for i in 0..n {
            for o in 0..out {
                let want: f32 = (0..inp).map(|k| x[i * inp + k] * w[o * inp + k]).sum();
                assert!((y[i * out + o] - want).abs() < 1e-5);
            }
        }
        let dx = matmul_nn(&y, n, &w, out, inp);
        for i in 0..n {
            for k in 0..inp {
                let want: f32 = (0..out).map(|o| y[i * out + o] * w[o * inp + k]).sum();
                assert!((dx[i * inp + k] - want).abs() < 1e-4);
            }
        }
        let mut g = vec![0f32; out * inp];
        matmul_tn_into(&y, out, &x, inp, n, &mut g, false);
        assert_eq!(matmul_tn(&y, out, &x, inp, n), g);
        for o in 0..out {
            for k in 0..inp {
                let want: f32 = (0..n).map(|i| y[i * out + o] * x[i * inp + k]).sum();
                assert!((g[o * inp + k] - want).abs() < 1e-4);
            }
        }
    }

    #[test]
    fn unzeroed_products_write_their_block() {
        // k = 0 writes zeros; a strided block leaves the gap columns as they were.
        let y = unsafe { filled(6, |y| gemm_write(2, 3, 0, y, 3, &[], 1, 1, &[], 1, 1, 1)) };
        assert_eq!(y, vec![0.0; 6]);
        let (a, b) = ([1.0f32, 2.0, 3.0, 4.0], [1.0f32, 0.0, 0.0, 1.0]);
        let mut dst = vec![MaybeUninit::new(9.0f32); 5];
        gemm_write(2, 2, 2, &mut dst, 3, &a, 2, 1, &b, 2, 1, 1);
        let got: Vec<f32> = dst.iter().map(|v| unsafe { v.assume_init() }).collect();
        assert_eq!(got, vec![1.0, 2.0, 9.0, 3.0, 4.0]);
    }

    #[test]
    fn tensor_round_trip() {
        let t = tensor(vec![1.0, 2.0, 3.0, 4.0], (2, 2)).unwrap();
        assert_eq!(to_vec(&t.t().unwrap()).unwrap(), vec![1.0, 3.0, 2.0, 4.0]);
    }
}

/// A small, fast, seedable random generator (SplitMix64) for dropout masks and initialisation:
/// reproducible across platforms and crate versions, unlike library RNGs whose streams may change.
#[derive(Debug, Clone)]
pub struct Rng {
    state: u64,
}

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Self {
            state: seed ^ 0x9E37_79B9_7F4A_7C15,
        }
    }

    /// The internal state (saved in checkpoints so a resumed run draws the same numbers).
    pub fn state(&self) -> u64 {
        self.state
    }

    /// Restores a state from [`state`](Self::state).
    pub fn from_state(state: u64) -> Self {
        Self { state }
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f32 {
        let u1 = ((self.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
        let u2 = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }

    /// A derived generator (for a layer or a step) that does not disturb this one's stream.
    pub fn fork(&self, salt: u64) -> Rng {
        let mut r = Rng::new(self.state ^ salt.wrapping_mul(0xD6E8_FEB8_6659_FD93));
        r.next_u64();
        r
    }
}

/// `c (m × n) = a (m × k) · b (k × n)`, all row-major.
pub fn matmul_nn(a: &[f32], m: usize, b: &[f32], k: usize, n: usize) -> Vec<f32> {
    // SAFETY: gemm_write writes every element of the m × n output.
    unsafe {
        filled(m * n, |c| {
            gemm_write(m, n, k, c, n, a, k, 1, b, n, 1, threads())
        })
    }
}

/// Peak resident memory of this process in MiB (`VmHWM`), 0 where unknown.
pub fn peak_rss_mib() -> f64 {
    proc_status_kib("VmHWM:") / 1024.0
}

/// Current resident memory of this process in MiB (`VmRSS`), 0 where unknown.
pub fn rss_mib() -> f64 {
    proc_status_kib("VmRSS:") / 1024.0
}

fn proc_status_kib(key: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
        })
        .unwrap_or(0.0)
}

/// Memory available to new allocations in MiB (`MemAvailable`), `None` where unknown.
pub fn available_mib() -> Option<f64> {
    std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
        s.lines()
            .find(|l| l.starts_with("MemAvailable:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .map(|k| k / 1024.0)
    })
}

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

#[cfg(test)]
mod exp_tests {
    use super::*;

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

/// Elements per parallel work item of the element-wise passes.
pub const PAR_CHUNK: usize = 1 << 14;

/// `dst += src`, element-wise, in parallel (residual connections, gradient sums).
///
/// # Panics
/// If the lengths differ.
pub fn add_assign(dst: &mut [f32], src: &[f32]) {
    use rayon::prelude::*;
    assert_eq!(dst.len(), src.len(), "add_assign: lengths differ");
    dst.par_chunks_mut(PAR_CHUNK)
        .zip(src.par_chunks(PAR_CHUNK))
        .for_each(|(d, s)| d.iter_mut().zip(s).for_each(|(a, b)| *a += b));
}

/// Adds the per-block partial sums `parts` (block order) over their first `len` elements, in
/// parallel over fixed ranges of the result; the order of the additions, and so the result,
/// does not depend on the thread count. (Column sums split over row blocks: adapter and
/// norm weight gradients.)
pub fn reduce_parts(parts: &[Vec<f32>], len: usize) -> Vec<f32> {
    const CHUNK: usize = 1 << 12;
    let mut out = vec![0f32; len];
    use rayon::prelude::*;
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, o)| {
        for p in parts {
            let src = &p[c * CHUNK..c * CHUNK + o.len()];
            o.iter_mut().zip(src).for_each(|(a, b)| *a += b);
        }
    });
    out
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
