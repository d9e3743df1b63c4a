//! Products with bf16 operands and f32 accumulation: what `bnb_4bit_compute_dtype=bfloat16`
//! and a bf16 model compute in PyTorch, on our own kernels (the `gemm` crate has none for bf16).
//!
//! An operand is anything that can hand out its elements as bf16 in pairs along the reduction
//! axis ([`PairRows`]): an f32 view (rounded to nearest even as it is read), a bf16 view
//! ([`Bf16Ref`]), or a 4-bit weight (decoded straight into bf16 by `quant`). Four kernel sets
//! compute the product ([`Bf16Kernel`]), chosen at run time:
//!
//! - `amx`: AMX tiles (`tdpbf16ps`, Sapphire Rapids and later), 2 × 2 tiles of 16 × 16 sums
//!   per step — several times the f32 FMA's rate where the CPU has them;
//! - `avx512bf16`: packed pair panels and a 12 × 32 register tile of `vdpbf16ps`, 32
//!   multiply-adds per instruction — twice the f32 FMA's on Zen 4/5, but half of it on the
//!   Intel cores measured (one `vdpbf16ps` per two cycles), which is why AMX comes first;
//! - `avx512f`: the same panels and tile with each pair product done as two f32 FMAs (AVX-512
//!   CPUs without BF16: it runs the native kernel's packing and tiling on every such machine,
//!   which is how they are tested where `vdpbf16ps` is missing);
//! - `portable`: operands rounded to bf16, widened to f32 in blocks, then gemm's f32 kernels.
//!
//! All three multiply the same bf16 values exactly (a bf16 × bf16 product fits an f32) and sum
//! in f32; they differ only in the order of the sums.

use std::sync::OnceLock;

use half::bf16;
use rayon::prelude::*;

use super::mat::{covers, gemm, Accum, MatMut, MatRef, Par};

mod amx;
pub mod dropped;
mod pack;
mod packed;
mod passes;
#[cfg(test)]
mod tests;

/// Which kernels compute the bf16 products.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bf16Kernel {
    /// AMX tiles with `tdpbf16ps` (Sapphire Rapids and later Xeons).
    Amx,
    /// AVX512_BF16 `vdpbf16ps` (Zen 4/5, Cooper Lake, Sapphire Rapids and later).
    Avx512Bf16,
    /// The native kernel's panels and tile, pair products as two AVX-512F FMAs.
    Avx512F,
    /// bf16 operands widened to f32, then the f32 kernels (any CPU).
    Portable,
}

impl Bf16Kernel {
    /// Every kernel set, fastest first.
    pub const ALL: [Bf16Kernel; 4] = [Self::Amx, Self::Avx512Bf16, Self::Avx512F, Self::Portable];

    /// The name printed at start and written to `summary.json`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Amx => "amx",
            Self::Avx512Bf16 => "avx512bf16",
            Self::Avx512F => "avx512f",
            Self::Portable => "portable",
        }
    }

    /// Parses [`name`](Self::name).
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == s)
    }

    /// Whether this CPU can run the kernel set.
    pub fn available(self) -> bool {
        match self {
            Self::Portable => true,
            Self::Amx => amx::available(),
            #[cfg(target_arch = "x86_64")]
            Self::Avx512F => std::arch::is_x86_feature_detected!("avx512f"),
            #[cfg(target_arch = "x86_64")]
            Self::Avx512Bf16 => {
                std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bf16")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// Whether the CPU has native bf16 dot products (what `compute_dtype = "auto"` asks).
    pub fn native_available() -> bool {
        Self::Amx.available() || Self::Avx512Bf16.available()
    }

    /// The kernel set bf16 products use in this process: `QDORA_BF16_KERNEL` when it names an
    /// available set, else `amx`, else `avx512bf16` where the CPU has it, else `portable` (on
    /// AVX-512F without BF16 the two FMAs per pair lose to gemm's f32 kernels; see
    /// docs/PERFORMANCE.md).
    pub fn selected() -> Self {
        static SELECTED: OnceLock<Bf16Kernel> = OnceLock::new();
        *SELECTED.get_or_init(|| {
            if let Ok(name) = std::env::var("QDORA_BF16_KERNEL") {
                match Self::parse(&name) {
                    Some(k) if k.available() => return k,
                    Some(k) => tracing::warn!(
                        kernel = k.name(),
                        "QDORA_BF16_KERNEL names a kernel set this CPU lacks; choosing another"
                    ),
                    None => tracing::warn!(
                        value = %name,
                        "QDORA_BF16_KERNEL is not amx, avx512bf16, avx512f or portable; ignored"
                    ),
                }
            }
            [Self::Amx, Self::Avx512Bf16]
                .into_iter()
                .find(|k| k.available())
                .unwrap_or(Self::Portable)
        })
    }
}

/// What the frozen base's products compute in (`compute_dtype`, `--compute-dtype`): bf16
/// operands with f32 sums, as `bnb_4bit_compute_dtype=torch.bfloat16` and a bf16 model, or f32.
/// Everything else (norms, softmax, the loss, DoRA's weight norm, AdamW, the adapter) stays f32.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum ComputeDtype {
    /// f32 products (the default: the f32 fixtures hold to 1e-5).
    #[default]
    F32,
    /// bf16 products, with native dot products where the CPU has them, else converted.
    Bf16,
    /// bf16 where the CPU has native bf16 dot products (AVX512_BF16), f32 elsewhere.
    Auto,
}

impl ComputeDtype {
    /// `auto` decided for this CPU (`f32` and `bf16` as they are).
    pub fn resolve(self) -> Self {
        match self {
            Self::Auto if Bf16Kernel::native_available() => Self::Bf16,
            Self::Auto => Self::F32,
            other => other,
        }
    }

    /// Whether the products run in bf16 (after [`resolve`](Self::resolve)).
    pub fn is_bf16(self) -> bool {
        self.resolve() == Self::Bf16
    }

    /// `f32`, `bf16` or `auto`.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::Auto => "auto",
        }
    }

    /// The kernels the products take: `gemm f32`, or `bf16 <kernel set>`.
    pub fn kernels(self) -> String {
        if self.is_bf16() {
            format!("bf16 {}", Bf16Kernel::selected().name())
        } else {
            "gemm f32".to_string()
        }
    }
}

/// Rounds to bf16 bits, to nearest even (a NaN stays a quiet NaN of the same sign): the same
/// bits as `half`'s `bf16::from_f32`, branch-free (NaN through a select) so loops over it
/// vectorize.
#[inline(always)]
pub fn to_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16;
    let nan = (b & 0x7fff_ffff) > 0x7f80_0000;
    if nan {
        (b >> 16) as u16 | 0x0040
    } else {
        rounded
    }
}

/// Widens bf16 bits to f32 (exact).
#[inline(always)]
pub fn from_bits(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// Rounds every value to bf16 (nearest even), in parallel: what a bf16 model's tensors hold.
pub fn round_slice(v: &[f32]) -> Vec<bf16> {
    v.par_iter().map(|&x| bf16::from_bits(to_bits(x))).collect()
}

/// Widens a bf16 slice to f32, in parallel.
pub fn widen_slice(v: &[bf16]) -> Vec<f32> {
    v.par_iter().map(|x| x.to_f32()).collect()
}

/// A read-only `rows × cols` bf16 matrix over a slice, with arbitrary element strides (the bf16
/// counterpart of [`MatRef`]).
#[derive(Debug, Clone, Copy)]
pub struct Bf16Ref<'a> {
    data: &'a [bf16],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> Bf16Ref<'a> {
    /// A contiguous row-major `rows × cols` matrix.
    ///
    /// # Panics
    /// If `data` is too short for the shape.
    #[track_caller]
    pub fn new(data: &'a [bf16], rows: usize, cols: usize) -> Self {
        Self::strided(data, rows, cols, cols)
    }

    /// A row-major `rows × cols` matrix whose rows start `row_stride` elements apart.
    ///
    /// # Panics
    /// If `data` is too short for the shape.
    #[track_caller]
    pub fn strided(data: &'a [bf16], rows: usize, cols: usize, row_stride: usize) -> Self {
        assert!(
            covers(data.len(), rows, cols, row_stride, 1),
            "Bf16Ref: {} elements for {rows}×{cols} with row stride {row_stride}",
            data.len()
        );
        Bf16Ref {
            data,
            rows,
            cols,
            rs: row_stride,
            cs: 1,
        }
    }

    /// The transposed view (`cols × rows`), no copy.
    pub fn t(self) -> Self {
        Bf16Ref {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }
}

/// A `k × n` operand of a bf16 product, read in pairs of consecutive rows (the reduction axis):
/// the pair layout `vdpbf16ps` multiplies. A left operand `A (m × k)` is given as its transpose.
pub trait PairRows: Sync {
    /// Rows (the reduction length `k`).
    fn rows(&self) -> usize;
    /// Columns.
    fn cols(&self) -> usize;
    /// Element `(i, j)` as bf16 bits (`i < rows`, `j < cols`).
    fn bits(&self, i: usize, j: usize) -> u16;

    /// Writes `kp` row pairs from row `k0`, columns `j0..j0 + nj`, into `out` with `width`
    /// slots per pair: `out[p·width + j]` = row `k0 + 2p` in the low half, row `k0 + 2p + 1` in
    /// the high half, zero past the last row and in slots `nj..width`.
    fn pack_pairs(
        &self,
        k0: usize,
        kp: usize,
        j0: usize,
        nj: usize,
        width: usize,
        out: &mut [u32],
    ) {
        pack_elementwise(self, k0, kp, j0, nj, width, out)
    }

    /// The same pairs column by column: `out[j·kp + p]` for `j < width` (the layout of an AMX
    /// left tile, whose rows are the product's rows), zero past the last row and in columns
    /// `nj..width`.
    fn pack_pairs_by_column(
        &self,
        k0: usize,
        kp: usize,
        j0: usize,
        nj: usize,
        width: usize,
        out: &mut [u32],
    ) {
        pack_by_column_elementwise(self, k0, kp, j0, nj, width, out)
    }

    /// Rows `r0..r1`, columns `c0..c1` as f32 (the bf16 values, widened), row-major into `out`.
    fn widen(&self, (r0, r1): (usize, usize), (c0, c1): (usize, usize), out: &mut [f32]) {
        for (i, row) in (r0..r1).zip(out.chunks_mut((c1 - c0).max(1))) {
            for (j, o) in (c0..c1).zip(row) {
                *o = from_bits(self.bits(i, j));
            }
        }
    }
}

impl PairRows for MatRef<'_> {
    fn rows(&self) -> usize {
        MatRef::rows(self)
    }
    fn cols(&self) -> usize {
        MatRef::cols(self)
    }
    #[inline(always)]
    fn bits(&self, i: usize, j: usize) -> u16 {
        to_bits(self.at(i, j))
    }

    fn pack_pairs(
        &self,
        k0: usize,
        kp: usize,
        j0: usize,
        nj: usize,
        width: usize,
        out: &mut [u32],
    ) {
        let out = &mut out[..kp * width];
        let rows = self.rows();
        let len = (2 * kp).min(rows.saturating_sub(k0));
        if nj > 0 && len > 0 && self.column_run(j0, k0, len).is_some() {
            // `xᵀ` of a row-major activation: each column's pairs are adjacent values
            let runs: Vec<&[f32]> = (j0..j0 + nj)
                .map(|j| self.column_run(j, k0, len).unwrap_or_default())
                .collect();
            pack::pairs_along_runs(&runs, to_bits, kp, width, out);
        } else if nj > 0 && len > 0 && self.row_run(k0, j0, nj).is_some() {
            // a row-major matrix: each pair slot interleaves two rows
            let row = |r: usize| self.row_run(r, j0, nj).unwrap_or_default();
            pack::pairs_across_rows(row, rows, k0, to_bits, width, out);
        } else {
            pack_elementwise(self, k0, kp, j0, nj, width, out);
        }
    }

    fn pack_pairs_by_column(
        &self,
        k0: usize,
        kp: usize,
        j0: usize,
        nj: usize,
        width: usize,
        out: &mut [u32],
    ) {
        let k0 = k0.min(self.rows());
        let len = (2 * kp).min(self.rows() - k0);
        if nj == 0 || self.column_run(j0, k0, len).is_none() {
            return pack_by_column_elementwise(self, k0, kp, j0, nj, width, out);
        }
        for (j, col) in out.chunks_mut(kp).take(width).enumerate() {
            let run = if j < nj {
                self.column_run(j0 + j, k0, len).unwrap_or_default()
            } else {
                &[]
            };
            pack::run_pairs(run, to_bits, col);
        }
    }
}

/// [`PairRows::pack_pairs`] element by element (any operand; views contiguous along either
/// axis take the routes in `pack`).
pub(super) fn pack_elementwise<P: PairRows + ?Sized>(
    src: &P,
    k0: usize,
    kp: usize,
    j0: usize,
    nj: usize,
    width: usize,
    out: &mut [u32],
) {
    let rows = src.rows();
    for (p, slot) in out.chunks_mut(width).take(kp).enumerate() {
        let r = k0 + 2 * p;
        for (j, s) in slot.iter_mut().enumerate() {
            *s = if j < nj && r < rows {
                let lo = src.bits(r, j0 + j) as u32;
                let hi = if r + 1 < rows {
                    src.bits(r + 1, j0 + j) as u32
                } else {
                    0
                };
                lo | hi << 16
            } else {
                0
            };
        }
    }
}

/// [`PairRows::pack_pairs_by_column`] element by element (any operand; views whose reduction
/// axis is contiguous take a faster route).
pub(super) fn pack_by_column_elementwise<P: PairRows + ?Sized>(
    src: &P,
    k0: usize,
    kp: usize,
    j0: usize,
    nj: usize,
    width: usize,
    out: &mut [u32],
) {
    let rows = src.rows();
    for (j, col) in out.chunks_mut(kp).take(width).enumerate() {
        for (p, s) in col.iter_mut().enumerate() {
            let r = k0 + 2 * p;
            *s = if j < nj && r < rows {
                let hi = if r + 1 < rows {
                    src.bits(r + 1, j0 + j) as u32
                } else {
                    0
                };
                src.bits(r, j0 + j) as u32 | hi << 16
            } else {
                0
            };
        }
    }
}

impl PairRows for Bf16Ref<'_> {
    fn rows(&self) -> usize {
        self.rows
    }
    fn cols(&self) -> usize {
        self.cols
    }
    #[inline(always)]
    fn bits(&self, i: usize, j: usize) -> u16 {
        self.data[i * self.rs + j * self.cs].to_bits()
    }

    fn pack_pairs(
        &self,
        k0: usize,
        kp: usize,
        j0: usize,
        nj: usize,
        width: usize,
        out: &mut [u32],
    ) {
        let out = &mut out[..kp * width];
        let rows_left = self.rows.saturating_sub(k0);
        if self.rs == 1 {
            // a transposed row-major matrix (`Wᵀ`): each column's pairs are adjacent values
            let len = (2 * kp).min(rows_left);
            let run = |j: usize| match len {
                0 => &[][..],
                _ => &self.data[j * self.cs + k0..][..len],
            };
            let runs: Vec<&[bf16]> = (j0..j0 + nj).map(run).collect();
            pack::pairs_along_runs(&runs, bf16::to_bits, kp, width, out);
        } else if self.cs == 1 {
            // a row-major matrix (`W`): each pair slot interleaves two rows
            let row = |r: usize| &self.data[r * self.rs + j0..][..nj];
            pack::pairs_across_rows(row, self.rows, k0, bf16::to_bits, width, out);
        } else {
            pack_elementwise(self, k0, kp, j0, nj, width, out);
        }
    }

    fn pack_pairs_by_column(
        &self,
        k0: usize,
        kp: usize,
        j0: usize,
        nj: usize,
        width: usize,
        out: &mut [u32],
    ) {
        if self.rs != 1 || nj == 0 {
            return pack_by_column_elementwise(self, k0, kp, j0, nj, width, out);
        }
        let k0 = k0.min(self.rows);
        let len = (2 * kp).min(self.rows - k0);
        for (j, col) in out.chunks_mut(kp).take(width).enumerate() {
            let run: &[bf16] = if j < nj {
                &self.data[(j0 + j) * self.cs + k0..][..len]
            } else {
                &[]
            };
            pack::run_pairs(run, bf16::to_bits, col);
        }
    }
}

/// `dst (m×n) = [dst +] scale · lhs (m×k) · rhs (k×n)` with bf16 operands and f32 sums, on the
/// [selected](Bf16Kernel::selected) kernel set; `lhs_t` is the left operand transposed
/// (`k × m`).
///
/// # Panics
/// If the shapes do not chain, or `acc` is [`Accum::Add`] on a view of unwritten memory.
#[track_caller]
pub fn gemm_bf16(
    dst: MatMut<'_>,
    acc: Accum,
    lhs_t: &dyn PairRows,
    rhs: &dyn PairRows,
    scale: f32,
    par: Par,
) {
    gemm_bf16_with(Bf16Kernel::selected(), dst, acc, lhs_t, rhs, scale, par)
}

/// [`gemm_bf16`] on a given kernel set (tests and benchmarks compare them).
///
/// # Panics
/// As [`gemm_bf16`], or if the kernel set is not [available](Bf16Kernel::available).
#[track_caller]
pub fn gemm_bf16_with(
    kernel: Bf16Kernel,
    mut dst: MatMut<'_>,
    acc: Accum,
    lhs_t: &dyn PairRows,
    rhs: &dyn PairRows,
    scale: f32,
    par: Par,
) {
    let (m, n, k) = (dst.rows(), dst.cols(), lhs_t.rows());
    assert!(
        lhs_t.cols() == m && rhs.rows() == k && rhs.cols() == n,
        "gemm_bf16: {m}×{} · {}×{} into {m}×{n}",
        lhs_t.rows(),
        rhs.rows(),
        rhs.cols()
    );
    assert!(
        kernel.available(),
        "bf16 kernel {} unavailable",
        kernel.name()
    );
    assert!(
        dst.is_init() || acc == Accum::Write,
        "gemm_bf16: adding into unwritten memory"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if acc == Accum::Write {
            dst.fill_zero();
        }
        return;
    }
    match kernel {
        Bf16Kernel::Portable => portable(dst, acc, lhs_t, rhs, scale, par),
        Bf16Kernel::Amx => amx::gemm(dst, acc, lhs_t, rhs, scale, par),
        _ => packed::gemm(kernel, dst, acc, lhs_t, rhs, scale, par),
    }
}

/// Rows of `x` up to which [`matmul_nt`] reads each weight row once per output (decoding),
/// instead of packing panels.
pub const GEMV_ROWS: usize = 4;

/// `x (n × k) · rhs (k × cols)` into a new `n × cols` matrix, `x` rounded to bf16: the one
/// shape every frozen-weight product takes (`rhs` is `Wᵀ` forward, `W` backward).
///
/// # Panics
/// If `x` is not `n × rhs.rows()`.
pub fn matmul(x: &[f32], n: usize, rhs: &dyn PairRows) -> Vec<f32> {
    let k = rhs.rows();
    assert_eq!(x.len(), n * k, "x is not {n} × {k}");
    let x = MatRef::new(x, n, k);
    // SAFETY: the product overwrites the whole n × cols output.
    unsafe {
        super::uninit::new_matrix(n, rhs.cols(), |y| {
            gemm_bf16(y, Accum::Write, &x.t(), rhs, 1.0, Par::All)
        })
    }
}

/// `y (n×out) = x (n×in) · wᵀ` for a row-major bf16 `w (out×in)`, `x` rounded to bf16.
pub fn matmul_nt(x: &[f32], n: usize, w: &[bf16], out: usize, inp: usize) -> Vec<f32> {
    if n <= GEMV_ROWS {
        return gemv_nt(x, n, w, out, inp);
    }
    matmul(x, n, &Bf16Ref::new(w, out, inp).t())
}

/// [`matmul_nt`] for a few rows: each thread takes a run of weight rows and, per row, the dot
/// products with every row of `x` (bf16 values, f32 sums of 16 lanes): the weight is read once,
/// which is what bounds decoding.
fn gemv_nt(x: &[f32], n: usize, w: &[bf16], out: usize, inp: usize) -> Vec<f32> {
    assert_eq!(x.len(), n * inp, "x is not {n} × {inp}");
    assert_eq!(w.len(), out * inp, "w is not {out} × {inp}");
    let xr: Vec<f32> = x.iter().map(|&v| from_bits(to_bits(v))).collect();
    const LANES: usize = 16;
    let dot = |wrow: &[bf16], xrow: &[f32]| {
        let mut acc = [0f32; LANES];
        let (wc, xc) = (wrow.chunks_exact(LANES), xrow.chunks_exact(LANES));
        let (wt, xt) = (wc.remainder(), xc.remainder());
        for (wv, xv) in wc.zip(xc) {
            for l in 0..LANES {
                acc[l] += from_bits(wv[l].to_bits()) * xv[l];
            }
        }
        let tail: f32 = wt.iter().zip(xt).map(|(a, b)| a.to_f32() * b).sum();
        acc.iter().sum::<f32>() + tail
    };
    // y is (n × out) but computed per weight row: collect (out × n), then transpose
    let mut yt = vec![0f32; out * n];
    yt.par_chunks_mut(n)
        .zip(w.par_chunks(inp.max(1)))
        .with_min_len(16)
        .for_each(|(yo, wrow)| {
            for (i, y) in yo.iter_mut().enumerate() {
                *y = dot(wrow, &xr[i * inp..(i + 1) * inp]);
            }
        });
    let mut y = vec![0f32; n * out];
    for o in 0..out {
        for i in 0..n {
            y[i * out + o] = yt[o * n + i];
        }
    }
    y
}

/// `dx (n×in) = dy (n×out) · w` for a row-major bf16 `w (out×in)`, `dy` rounded to bf16.
pub fn matmul_nn(dy: &[f32], n: usize, w: &[bf16], out: usize, inp: usize) -> Vec<f32> {
    matmul(dy, n, &Bf16Ref::new(w, out, inp))
}

/// Reduction rows widened per block of the portable route.
const PORTABLE_K: usize = 256;
/// Output columns per block of the portable route (the widened right operand stays ≤ 2 MiB).
const PORTABLE_N: usize = 2048;

/// Widens `PORTABLE_K` reduction rows of both operands at a time and adds their f32 product.
fn portable(
    mut dst: MatMut<'_>,
    acc: Accum,
    lhs_t: &dyn PairRows,
    rhs: &dyn PairRows,
    scale: f32,
    par: Par,
) {
    let (m, n, k) = (dst.rows(), dst.cols(), lhs_t.rows());
    let kb_max = PORTABLE_K.min(k);
    let mut at = vec![0f32; kb_max * m];
    let mut bt = vec![0f32; kb_max * PORTABLE_N.min(n)];
    for k0 in (0..k).step_by(PORTABLE_K) {
        let k1 = (k0 + PORTABLE_K).min(k);
        let kb = k1 - k0;
        widen_par(lhs_t, (k0, k1), (0, m), &mut at[..kb * m]);
        let a = MatRef::new(&at[..kb * m], kb, m).t();
        let first = k0 == 0 && acc == Accum::Write;
        for n0 in (0..n).step_by(PORTABLE_N) {
            let n1 = (n0 + PORTABLE_N).min(n);
            let b = &mut bt[..kb * (n1 - n0)];
            widen_par(rhs, (k0, k1), (n0, n1), b);
            let b = MatRef::new(b, kb, n1 - n0);
            let a_acc = if first { Accum::Write } else { Accum::Add };
            gemm(dst.columns(n0, n1), a_acc, a, b, scale, par);
        }
        if first {
            // SAFETY: the first reduction block overwrote every column block of `dst`.
            unsafe { dst.assume_init() };
        }
    }
}

/// [`PairRows::widen`] split over rayon tasks by rows.
fn widen_par(
    src: &dyn PairRows,
    (r0, r1): (usize, usize),
    (c0, c1): (usize, usize),
    out: &mut [f32],
) {
    let w = c1 - c0;
    let rows_per = (16384 / w.max(1)).max(1);
    out.par_chunks_mut(rows_per * w.max(1))
        .enumerate()
        .for_each(|(t, chunk)| {
            let a = r0 + t * rows_per;
            let b = (a + rows_per).min(r1);
            src.widen((a, b), (c0, c1), chunk);
        });
}

/// GFLOP/s of a `size³` bf16 product on `kernel`, best of `reps` (f32 operands rounded while
/// packing, as the training products read their activations).
pub fn gemm_gflops(kernel: Bf16Kernel, (m, n, k): (usize, usize, usize), reps: usize) -> f64 {
    let a: Vec<bf16> = (0..m * k)
        .map(|i| bf16::from_f32(((i % 7) as f32) * 0.25))
        .collect();
    let b: Vec<bf16> = (0..k * n)
        .map(|i| bf16::from_f32(((i % 5) as f32) * 0.5))
        .collect();
    let mut c = vec![0f32; m * n];
    let (a, b) = (Bf16Ref::new(&a, m, k), Bf16Ref::new(&b, k, n));
    let mut best = f64::MAX;
    for _ in 0..reps.max(1) {
        let t = std::time::Instant::now();
        gemm_bf16_with(
            kernel,
            MatMut::new(&mut c, m, n),
            Accum::Write,
            &a.t(),
            &b,
            1.0,
            Par::All,
        );
        best = best.min(t.elapsed().as_secs_f64());
    }
    2.0 * (m * n * k) as f64 / best / 1e9
}
