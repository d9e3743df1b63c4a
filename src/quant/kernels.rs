//! CPU kernels on 4-bit weights: fast dequantization (to f32 and bf16) and the fused 4-bit
//! matmuls a trainer needs, `y = x·Wᵀ` and `dx = dy·W`, which dequantize W one tile at a time
//! (`dy·W`: a block of rows; `x·Wᵀ`: a block of columns, written transposed) into a reusable
//! buffer and hand each tile to the `gemm` microkernels (the same ones candle uses), so the whole
//! dequantized matrix of a large layer never exists at once. A forward with only a few rows of
//! activations (decoding) takes the tile-free route in `gemv` instead.
//!
//! Reference scalar path: `blockwise::dequantize_4bit_ref` (tested against this one).

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::gemv;
use crate::ops::{gemm, transpose, Accum, MatMut, MatRef, Par};

/// Rows (`dy·W`) or columns (`x·Wᵀ`) of W dequantized per tile in the fused matmuls. 512 rows
/// of a 4096-wide layer are 8 MiB of f32: large enough that gemm's packing of the activations is
/// amortised, small next to the weight.
pub const TILE_ROWS: usize = 512;
/// Output rows per band of the transposed 4-bit forward (see `Packed4::matmul_t2`): a band's
/// tile (512 × 4096 floats, 8 MiB) and its part of `y` stay bounded for wide layers (11008 rows).
const BAND_ROWS: usize = 4096;
/// Elements per parallel dequantization chunk (even, so a chunk never splits a byte).
const DEQUANT_CHUNK: usize = 1 << 14;

/// Both codes of every byte value multiplied out: `PAIR[b] = [code[b >> 4], code[b & 15]]`.
fn pair_table(code: &[f32; 16]) -> [[f32; 2]; 256] {
    let mut t = [[0f32; 2]; 256];
    for (b, slot) in t.iter_mut().enumerate() {
        *slot = [code[b >> 4], code[b & 0x0f]];
    }
    t
}

/// Dequantizes the flat element range `start..start + out.len()` into `out` (f32), in parallel.
///
/// # Panics
/// If the range exceeds the packed data or `absmax`.
pub fn dequantize_range(
    packed: &[u8],
    absmax: &[f32],
    code: &[f32; 16],
    blocksize: usize,
    start: usize,
    out: &mut [f32],
) {
    let table = pair_table(code);
    out.par_chunks_mut(DEQUANT_CHUNK)
        .enumerate()
        .for_each(|(ci, chunk)| {
            dequantize_serial(
                packed,
                absmax,
                &table,
                blocksize,
                start + ci * DEQUANT_CHUNK,
                chunk,
            )
        });
}

/// Single-threaded dequantization of a flat range; `start` may be odd.
fn dequantize_serial(
    packed: &[u8],
    absmax: &[f32],
    table: &[[f32; 2]; 256],
    blocksize: usize,
    start: usize,
    out: &mut [f32],
) {
    let end = start + out.len();
    let mut i = start;
    let mut o = 0usize;
    if i % 2 == 1 && i < end {
        out[o] = table[packed[i / 2] as usize][1] * absmax[i / blocksize];
        i += 1;
        o += 1;
    }
    while i < end {
        let block_end = ((i / blocksize + 1) * blocksize).min(end);
        let scale = absmax[i / blocksize];
        let pairs = (block_end - i) / 2;
        let bytes = &packed[i / 2..i / 2 + pairs];
        let dst = &mut out[o..o + 2 * pairs];
        let done = simd::dequant_pairs(bytes, table, scale, dst);
        for (d, &b) in dst[2 * done..].chunks_exact_mut(2).zip(&bytes[done..]) {
            let p = table[b as usize];
            d[0] = p[0] * scale;
            d[1] = p[1] * scale;
        }
        i += 2 * pairs;
        o += 2 * pairs;
        if i < block_end {
            // odd element at the end of the range
            out[o] = table[packed[i / 2] as usize][0] * scale;
            i += 1;
            o += 1;
        }
    }
}

/// AVX2 path of the dequantization inner loop: 8 outputs per iteration from 4 packed bytes,
/// nibbles expanded by per-lane shifts and looked up with two 8-entry permutes. Returns how many
/// bytes it handled (the scalar loop does the rest; 0 without AVX2).
pub(super) mod simd {
    /// Dequantizes as many whole groups of 4 bytes as possible.
    pub fn dequant_pairs(
        bytes: &[u8],
        table: &[[f32; 2]; 256],
        scale: f32,
        dst: &mut [f32],
    ) -> usize {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2") {
                // The 16 codes are table[b][0] for b = c << 4 (high nibble c).
                let mut code = [0f32; 16];
                for (c, v) in code.iter_mut().enumerate() {
                    *v = table[c << 4][0];
                }
                // SAFETY: AVX2 was detected at run time; the function reads/writes only inside
                // the slices (checked lengths).
                return unsafe { avx2(bytes, &code, scale, dst) };
            }
        }
        let _ = (bytes, table, scale, dst);
        0
    }

    use crate::ops::lanes::F8;

    /// The code table for [`Nibbles::dequant8`], the 8-lane dequantization the transposing
    /// tile writer calls (AVX2 builds; a portable version otherwise, never on a hot path).
    pub struct Nibbles {
        code: [f32; 16],
    }

    impl Nibbles {
        /// For the code table `code` (code order).
        pub fn new(code: &[f32; 16]) -> Self {
            Nibbles { code: *code }
        }

        /// Codes of `bytes[..4]` (high nibble first) times `scale`.
        #[inline(always)]
        pub fn dequant8(&self, bytes: &[u8], scale: f32) -> F8 {
            assert!(bytes.len() >= 4);
            #[cfg(all(
                target_arch = "x86_64",
                target_feature = "avx2",
                target_feature = "fma"
            ))]
            // SAFETY: AVX2 is enabled for the whole build; 4 bytes checked above.
            return F8::from_m256(unsafe { codes8(bytes, &self.code, scale) });
            #[cfg(not(all(
                target_arch = "x86_64",
                target_feature = "avx2",
                target_feature = "fma"
            )))]
            {
                let mut v = [0f32; 8];
                for (i, x) in v.iter_mut().enumerate() {
                    let b = bytes[i / 2];
                    let nib = if i % 2 == 0 { b >> 4 } else { b & 0x0f };
                    *x = self.code[nib as usize] * scale;
                }
                F8::load(&v)
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn avx2(bytes: &[u8], code: &[f32; 16], scale: f32, dst: &mut [f32]) -> usize {
        use std::arch::x86_64::*;
        let groups = bytes.len() / 4;
        assert!(dst.len() >= groups * 8);
        for g in 0..groups {
            let v = codes8(&bytes[4 * g..4 * g + 4], code, scale);
            _mm256_storeu_ps(dst.as_mut_ptr().add(8 * g), v);
        }
        groups * 4
    }

    /// Codes of `bytes[..4]` (high nibble first) times `scale`, in 8 lanes: the nibbles are
    /// spread by per-lane shifts and looked up with two 8-entry permutes.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn codes8(bytes: &[u8], code: &[f32; 16], scale: f32) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        let w = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        let lut_lo = _mm256_loadu_ps(code.as_ptr());
        let lut_hi = _mm256_loadu_ps(code.as_ptr().add(8));
        let shifts = _mm256_setr_epi32(4, 0, 12, 8, 20, 16, 28, 24);
        let idx = _mm256_and_si256(
            _mm256_srlv_epi32(_mm256_set1_epi32(w as i32), shifts),
            _mm256_set1_epi32(15),
        );
        let lo = _mm256_permutevar8x32_ps(lut_lo, idx);
        let hi = _mm256_permutevar8x32_ps(lut_hi, idx);
        let sel = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));
        _mm256_mul_ps(_mm256_blendv_ps(lo, hi, sel), _mm256_set1_ps(scale))
    }
}

/// A 4-bit matrix view for the fused kernels: W is `rows × cols` (out × in), row-major.
pub struct Packed4<'a> {
    /// Packed nibbles, `(rows*cols+1)/2` bytes.
    pub packed: &'a [u8],
    /// f32 absmax per block.
    pub absmax: &'a [f32],
    /// Code values in code order.
    pub code: &'a [f32; 16],
    /// Elements per block.
    pub blocksize: usize,
    /// Output features.
    pub rows: usize,
    /// Input features.
    pub cols: usize,
}

/// The second product of [`Packed4::matmul_t2`]: `(x2, M2, y2)` with `y2 = x2 · Wᵀ` written.
pub type SecondProduct<'a> = (&'a [f32], usize, &'a mut [MaybeUninit<f32>]);

impl Packed4<'_> {
    /// `y (M×rows) = x (M×cols) · Wᵀ`, dequantizing W one tile at a time (a transposed block of
    /// columns; a block of rows where the row length or block size rules that out). Every
    /// element of `y` is written before it is read (see [`ops::filled`](crate::ops::filled)).
    ///
    /// # Panics
    /// If `x.len() != m * cols` or `y.len() != m * rows`.
    pub fn matmul_t(&self, x: &[f32], m: usize, y: &mut [MaybeUninit<f32>]) {
        self.matmul_t2(x, m, y, None)
    }

    /// [`matmul_t`](Self::matmul_t), plus `y2 (M2×rows) = x2 (M2×cols) · Wᵀ` from the same
    /// dequantized tiles when `second = (x2, M2, y2)` is given (DoRA's `A·Wᵀ` next to the
    /// forward product, without a second dequantization pass).
    ///
    /// # Panics
    /// If a length does not match its shape.
    pub fn matmul_t2(
        &self,
        x: &[f32],
        m: usize,
        y: &mut [MaybeUninit<f32>],
        second: Option<SecondProduct<'_>>,
    ) {
        assert_eq!(x.len(), m * self.cols, "x shape");
        assert_eq!(y.len(), m * self.rows, "y shape");
        if let Some((x2, m2, y2)) = &second {
            assert_eq!(x2.len(), m2 * self.cols, "x2 shape");
            assert_eq!(y2.len(), m2 * self.rows, "y2 shape");
        }
        // A few rows of `x` (decoding): dot products over the packed rows, no tiles; each
        // product takes its route by its own row count, so `y` does not depend on `second`.
        if m <= gemv::MAX_ROWS && self.rows_route_fits() {
            self.matmul_t_rows(x, m, y);
            if let Some((x2, m2, y2)) = second {
                self.matmul_t2(x2, m2, y2, None);
            }
            return;
        }
        let transposed = transpose::available(self.cols) && self.blocksize.is_multiple_of(8);
        if transposed {
            self.matmul_t2_by_columns(x, m, y, second);
            return;
        }
        let (rows, cols) = (self.rows, self.cols);
        let xm = MatRef::new(x, m, cols);
        let mut ym = MatMut::uninit(y, m, rows, rows);
        let mut second = second.map(|(x2, m2, y2)| {
            (
                MatRef::new(x2, m2, cols),
                MatMut::uninit(y2, m2, rows, rows),
            )
        });
        let mut tile = vec![0f32; TILE_ROWS.min(rows) * cols];
        for r0 in (0..rows).step_by(TILE_ROWS) {
            let r1 = (r0 + TILE_ROWS).min(rows);
            let t = &mut tile[..(r1 - r0) * cols];
            self.dequantize_rows(r0, t);
            // The tile of W's rows, as gemm's rhs transposed (element (k, n) = W[r0 + n][k]).
            let wt = MatRef::new(t, r1 - r0, cols).t();
            gemm(ym.columns(r0, r1), Accum::Write, xm, wt, 1.0, Par::All);
            if let Some((x2, y2)) = &mut second {
                gemm(y2.columns(r0, r1), Accum::Write, *x2, wt, 1.0, Par::All);
            }
        }
    }

    /// Panics unless the codes and scales cover all `rows × cols` elements (the kernels that
    /// index them directly check this once, up front).
    pub(crate) fn assert_covers_matrix(&self) {
        let n = self.rows * self.cols;
        assert!(self.packed.len() * 2 >= n, "packed data too short");
        assert!(self.absmax.len() * self.blocksize >= n, "absmax too short");
    }

    /// Dequantizes the `t.len() / cols` rows of W from row `r0` on into `t`, as rows.
    fn dequantize_rows(&self, r0: usize, t: &mut [f32]) {
        let start = r0 * self.cols;
        dequantize_range(
            self.packed,
            self.absmax,
            self.code,
            self.blocksize,
            start,
            t,
        );
    }

    /// [`matmul_t2`](Self::matmul_t2) on the transposed route: W is dequantized one block of
    /// [`TILE_ROWS`] input features (columns) of a band of up to [`BAND_ROWS`] rows at a time
    /// into a transposed tile `Wᵀ[k0..k1, band]`, and `y[:, band] (+)= x[:, k0..k1]·tile` — the
    /// shape of the backward's `dy·W` (short reduction, wide outputs, the tile read row-major).
    /// Row tiles with the whole reduction had gemm re-pack `x` for every tile: AVX-512 kernels
    /// ran them at 248–253 GFLOP/s against 300–310 for the backward's shape.
    fn matmul_t2_by_columns(
        &self,
        x: &[f32],
        m: usize,
        y: &mut [MaybeUninit<f32>],
        second: Option<SecondProduct<'_>>,
    ) {
        let (rows, cols) = (self.rows, self.cols);
        if m == 0 && second.as_ref().is_none_or(|s| s.1 == 0) {
            return;
        }
        let band_rows = BAND_ROWS.min(rows);
        let mut tile = vec![0f32; TILE_ROWS.min(cols) * band_rows];
        let xm = MatRef::new(x, m, cols);
        let mut ym = MatMut::uninit(y, m, rows, rows);
        let mut second = second.map(|(x2, m2, y2)| {
            (
                MatRef::new(x2, m2, cols),
                MatMut::uninit(y2, m2, rows, rows),
            )
        });
        // Bands of output rows, each finished over all column blocks: the tile and the part of
        // `y` it adds to stay bounded however many rows W has.
        for r0 in (0..rows).step_by(band_rows.max(1)) {
            let r1 = (r0 + band_rows).min(rows);
            let nb = r1 - r0;
            let mut band = ym.columns(r0, r1);
            let mut band2 = second.as_mut().map(|(x2, y2)| (*x2, y2.columns(r0, r1)));
            for k0 in (0..cols).step_by(TILE_ROWS) {
                let k1 = (k0 + TILE_ROWS).min(cols);
                let t = &mut tile[..(k1 - k0) * nb];
                self.dequantize_cols_transposed((k0, k1), (r0, r1), t);
                let tm = MatRef::new(t, k1 - k0, nb);
                // The first block writes the band's outputs, the others add to them.
                let acc = if k0 == 0 { Accum::Write } else { Accum::Add };
                gemm(band.rb(), acc, xm.columns(k0, k1), tm, 1.0, Par::All);
                if let Some((x2, b2)) = &mut band2 {
                    gemm(b2.rb(), acc, x2.columns(k0, k1), tm, 1.0, Par::All);
                }
                if k0 == 0 {
                    // SAFETY: the first column block overwrote both bands whole.
                    unsafe {
                        band.assume_init();
                        if let Some((_, b2)) = &mut band2 {
                            b2.assume_init();
                        }
                    }
                }
            }
        }
    }

    /// Dequantizes columns `k0..k1` of rows `r0..r1` of W transposed into `t`
    /// (`(k1 − k0) × (r1 − r0)`), bit-identical to [`dequantize_range`]. Requires
    /// [`transpose::available`] for `cols` and `k1 − k0`, `k0` a multiple of 8 and a block size
    /// that is a multiple of 8, so that 8 consecutive codes share one scale and 4 whole bytes.
    fn dequantize_cols_transposed(
        &self,
        (k0, k1): (usize, usize),
        (r0, r1): (usize, usize),
        t: &mut [f32],
    ) {
        let (rows, cols) = (self.rows, self.cols);
        assert!(
            k0 % 8 == 0 && k1 <= cols,
            "column block {k0}..{k1} of {cols}"
        );
        self.assert_covers_matrix();
        let nibbles = simd::Nibbles::new(self.code);
        // transpose_with's "rows" are W's rows, its "columns" the block's k0..k1.
        assert!(r1 <= rows, "row band {r0}..{r1} of {rows}");
        transpose::transpose_with(
            r0,
            r1,
            k1 - k0,
            t,
            |row, col| {
                let i = row * cols + k0 + col;
                let scale = self.absmax[i / self.blocksize];
                nibbles.dequant8(&self.packed[i / 2..i / 2 + 4], scale)
            },
            |row, col| {
                let i = row * cols + k0 + col;
                let b = self.packed[i / 2];
                let nib = if i % 2 == 0 { b >> 4 } else { b & 0x0f };
                self.code[nib as usize] * self.absmax[i / self.blocksize]
            },
        );
    }

    /// `dx (M×cols) = dy (M×rows) · W`, dequantizing W one tile of rows at a time, plus
    /// `dx2 = dy2 · W` from the same tiles when `second = (dy2, dx2)` is given (the same `M`;
    /// PEFT-form DoRA's dropped-out base path). Every element of `dx` (and `dx2`) is written
    /// before it is read (the first tile writes, the others add).
    ///
    /// # Panics
    /// If `dy.len() != m * rows` or `dx.len() != m * cols` (the same for `dy2`, `dx2`).
    pub fn matmul(
        &self,
        dy: &[f32],
        m: usize,
        dx: &mut [MaybeUninit<f32>],
        second: Option<(&[f32], &mut [MaybeUninit<f32>])>,
    ) {
        assert_eq!(dy.len(), m * self.rows, "dy shape");
        assert_eq!(dx.len(), m * self.cols, "dx shape");
        if let Some((dy2, dx2)) = &second {
            assert_eq!(dy2.len(), m * self.rows, "dy2 shape");
            assert_eq!(dx2.len(), m * self.cols, "dx2 shape");
        }
        if self.rows == 0 {
            dx.fill(MaybeUninit::new(0.0));
            if let Some((_, dx2)) = second {
                dx2.fill(MaybeUninit::new(0.0));
            }
            return;
        }
        if m == 0 || self.cols == 0 {
            return;
        }
        let (rows, cols) = (self.rows, self.cols);
        let dym = MatRef::new(dy, m, rows);
        let mut dxm = MatMut::uninit(dx, m, cols, cols);
        let mut second = second.map(|(dy2, dx2)| {
            (
                MatRef::new(dy2, m, rows),
                MatMut::uninit(dx2, m, cols, cols),
            )
        });
        let mut tile = vec![0f32; TILE_ROWS.min(rows) * cols];
        for r0 in (0..rows).step_by(TILE_ROWS) {
            let r1 = (r0 + TILE_ROWS).min(rows);
            let t = &mut tile[..(r1 - r0) * cols];
            self.dequantize_rows(r0, t);
            let tm = MatRef::new(t, r1 - r0, cols);
            // The first tile writes all of `dx`, the others add to it.
            let acc = if r0 == 0 { Accum::Write } else { Accum::Add };
            gemm(dxm.rb(), acc, dym.columns(r0, r1), tm, 1.0, Par::All);
            if let Some((dy2, dx2)) = &mut second {
                gemm(dx2.rb(), acc, dy2.columns(r0, r1), tm, 1.0, Par::All);
            }
            if r0 == 0 {
                // SAFETY: the first tile overwrote both outputs whole.
                unsafe {
                    dxm.assume_init();
                    if let Some((_, dx2)) = &mut second {
                        dx2.assume_init();
                    }
                }
            }
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::quant::blockwise::{dequantize_4bit_ref, quantize_4bit, QuantType};

    /// `n` pseudo-random values in [−0.5, 0.5) (also the `gemv` tests' weights and inputs).
    pub(in crate::quant) fn sample(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32) - 0.5
            })
            .collect()
    }

    #[test]
    fn fast_dequant_equals_reference_on_odd_ranges() {
        let data = sample(4097, 1);
        let code = QuantType::Nf4.code();
        let (packed, absmax) = quantize_4bit(&data, QuantType::Nf4, 64).unwrap();
        let mut want = vec![0f32; 4097];
        dequantize_4bit_ref(&packed, &absmax, &code, 64, &mut want);
        for (s, e) in [(0, 4097), (1, 4096), (63, 130), (64, 65), (3, 4)] {
            let mut got = vec![0f32; e - s];
            dequantize_range(&packed, &absmax, &code, 64, s, &mut got);
            assert_eq!(got, want[s..e], "range {s}..{e}");
        }
    }

    /// A random `rows × cols` weight quantized with block size 64, and its reference
    /// dequantization.
    struct Sample {
        packed: Vec<u8>,
        absmax: Vec<f32>,
        code: [f32; 16],
        dequantized: Vec<f32>,
        rows: usize,
        cols: usize,
    }

    impl Sample {
        fn new(rows: usize, cols: usize, qt: QuantType, seed: u64) -> Self {
            let code = qt.code();
            let (packed, absmax) = quantize_4bit(&sample(rows * cols, seed), qt, 64).unwrap();
            let mut dequantized = vec![0f32; rows * cols];
            dequantize_4bit_ref(&packed, &absmax, &code, 64, &mut dequantized);
            Sample {
                packed,
                absmax,
                code,
                dequantized,
                rows,
                cols,
            }
        }

        fn view(&self) -> Packed4<'_> {
            Packed4 {
                packed: &self.packed,
                absmax: &self.absmax,
                code: &self.code,
                blocksize: 64,
                rows: self.rows,
                cols: self.cols,
            }
        }
    }

    #[test]
    fn transposed_dequant_is_bit_identical() {
        let (rows, cols) = (45, 136);
        let q = Sample::new(rows, cols, QuantType::Nf4, 5);
        let (p, want) = (q.view(), &q.dequantized);
        if !transpose::available(cols) {
            eprintln!(
                "skipped: the transposed 4-bit tiles need AVX2 + FMA, which this build lacks"
            );
            return;
        }
        // whole width, a block inside (scales shared with the neighbours), the last strip
        // and all rows, a band inside, a band at the end
        for ((k0, k1), (r0, r1)) in [
            ((0, cols), (0, rows)),
            ((8, 72), (3, 40)),
            ((128, cols), (32, rows)),
        ] {
            let nb = r1 - r0;
            let mut t = vec![f32::NAN; (k1 - k0) * nb];
            p.dequantize_cols_transposed((k0, k1), (r0, r1), &mut t);
            for r in r0..r1 {
                for c in k0..k1 {
                    let got = t[(c - k0) * nb + r - r0];
                    assert_eq!(got.to_bits(), want[r * cols + c].to_bits(), "({r}, {c})");
                }
            }
        }
    }

    #[test]
    fn fused_matmuls_equal_dense() {
        // two tiles with a partial row group; then a width the transposed path cannot take
        // and several column blocks of the transposed route, the last one partial
        // and two bands of output rows
        for (rows, cols, m) in [
            (600, 96, 7),
            (37, 100, 5),
            (45, 2 * TILE_ROWS + 72, 3),
            (BAND_ROWS + 4, TILE_ROWS + 8, 2),
        ] {
            fused_matmuls_equal_dense_for(rows, cols, m);
        }
    }

    /// Two outputs of a two-product kernel call, pre-filled with NaN so that an element the
    /// kernel leaves unwritten shows in the comparisons.
    fn nan_filled_pair(
        len_a: usize,
        len_b: usize,
        call: impl FnOnce(&mut [MaybeUninit<f32>], &mut [MaybeUninit<f32>]),
    ) -> (Vec<f32>, Vec<f32>) {
        let mut a = vec![MaybeUninit::new(f32::NAN); len_a];
        let mut b = vec![MaybeUninit::new(f32::NAN); len_b];
        call(&mut a, &mut b);
        // SAFETY: every element was initialized above (NaN) before the call wrote some.
        unsafe {
            (
                a.iter().map(|v| v.assume_init()).collect(),
                b.iter().map(|v| v.assume_init()).collect(),
            )
        }
    }

    fn fused_matmuls_equal_dense_for(rows: usize, cols: usize, m: usize) {
        let q = Sample::new(rows, cols, QuantType::Fp4, 2);
        let x = sample(m * cols, 3);
        let dy = sample(m * rows, 4);
        let (p, wd) = (q.view(), &q.dequantized);
        // SAFETY: both products write every element of their output.
        let y = unsafe { crate::ops::uninit::filled(m * rows, |y| p.matmul_t(&x, m, y)) };
        // the second product from the same tiles (DoRA's A·Wᵀ): what matmul_t gives for it
        let (m2, x2) = (3, sample(3 * cols, 5));
        let (y1, y2) = nan_filled_pair(m * rows, m2 * rows, |y1, y2| {
            p.matmul_t2(&x, m, y1, Some((&x2, m2, y2)))
        });
        assert_eq!(y1, y, "matmul_t2's first product is matmul_t's");
        // row `i` of `x` times row `r` of the dequantized W, in f64
        let xw = |x: &[f32], i: usize, r: usize| -> f64 {
            (0..cols)
                .map(|c| x[i * cols + c] as f64 * wd[r * cols + c] as f64)
                .sum()
        };
        for i in 0..m2 {
            for r in 0..rows {
                let want = xw(&x2, i, r);
                assert!(
                    (y2[i * rows + r] as f64 - want).abs() < 1e-4,
                    "second ({i}, {r})"
                );
            }
        }
        let dx = unsafe { crate::ops::uninit::filled(m * cols, |dx| p.matmul(&dy, m, dx, None)) };
        // the backward's second product from the same tiles (PEFT-form DoRA): the first is
        // the same to the bit, the second what the first would give for its input
        let dy2 = sample(m * rows, 6);
        let (dxa, dxb) = nan_filled_pair(m * cols, m * cols, |dxa, dxb| {
            p.matmul(&dy, m, dxa, Some((&dy2, dxb)))
        });
        assert_eq!(dxa, dx, "the first backward product is matmul's alone");
        let dx2 = unsafe { crate::ops::uninit::filled(m * cols, |dx| p.matmul(&dy2, m, dx, None)) };
        assert_eq!(dxb, dx2, "the second backward product is matmul's alone");
        for i in 0..m {
            for r in 0..rows {
                let want = xw(&x, i, r);
                assert!((y[i * rows + r] as f64 - want).abs() < 1e-4);
            }
            for c in 0..cols {
                let want: f64 = (0..rows)
                    .map(|r| dy[i * rows + r] as f64 * wd[r * cols + c] as f64)
                    .sum();
                assert!((dx[i * cols + c] as f64 - want).abs() < 1e-4);
            }
        }
    }
}
