//! The 4-bit forward for a few rows of activations, `y = x·Wᵀ` with `x` of at most
//! [`MAX_ROWS`] rows: decoding (one token per sequence) and short prompts. Each output row is
//! a dot product of `x` with W's row, decoded eight codes at a time in registers and never
//! written out, so the weight is read once at half a byte per element. The tile route of
//! [`Packed4::matmul_t2`] writes every weight as f32 first (four bytes written for half a byte
//! read) and then hands gemm a product with a single row, which for one token cost several
//! times the product itself; bitsandbytes has `gemv_4bit` for the same case.
//!
//! The weights are the same to the bit as the tile route's (the same 8-lane decoding); the
//! sums run in another order, so results differ from it by rounding only.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::kernels::{simd::Nibbles, Packed4};
use crate::ops::lanes::F8;

/// Rows of `x` up to which [`Packed4::matmul_t2`] takes this route. Each row of `x` adds one
/// fused multiply-add per decoded group of eight weights, so the decoding is shared by up to
/// eight of them; measured on a 2-core Zen 3 against the tile route (`y = x·Wᵀ`, 4-bit,
/// 4096², 11008×4096, 2816×1024, 1024×2816): 5–7× faster at 1 row, 3–5× at 8, 2–3× at 16,
/// even or worse from 32 rows on.
pub const MAX_ROWS: usize = 16;

/// Output rows (of W) per parallel task: 64 rows of a 4096-wide layer are 128 KiB of codes.
const ROWS_PER_TASK: usize = 64;

impl Packed4<'_> {
    /// Whether [`matmul_t_rows`](Self::matmul_t_rows) takes W: every group of eight codes
    /// must start a byte and share one scale (rows a multiple of 8 long, blocks a multiple of 8).
    pub fn rows_route_fits(&self) -> bool {
        self.cols.is_multiple_of(8) && self.blocksize.is_multiple_of(8) && self.blocksize > 0
    }

    /// `y (m × rows) = x (m × cols) · Wᵀ` by dot products over W's packed rows, in parallel
    /// over W's rows. Every element of `y` is written.
    ///
    /// # Panics
    /// If a length does not match its shape, `m > MAX_ROWS`, or W does not
    /// [fit](Self::rows_route_fits).
    pub fn matmul_t_rows(&self, x: &[f32], m: usize, y: &mut [MaybeUninit<f32>]) {
        let (rows, cols) = (self.rows, self.cols);
        assert_eq!(x.len(), m * cols, "x shape");
        assert_eq!(y.len(), m * rows, "y shape");
        assert!(m <= MAX_ROWS, "{m} rows of x: at most {MAX_ROWS}");
        assert!(
            self.rows_route_fits(),
            "{cols} columns, block {}",
            self.blocksize
        );
        self.assert_covers_matrix();
        if m == 0 {
            return;
        }
        // Per task, the dots of its W rows, row-major as (W row, x row); laid out as y after.
        let mut dots = vec![0f32; rows * m];
        let nibbles = Nibbles::new(self.code);
        dots.par_chunks_mut(ROWS_PER_TASK * m)
            .enumerate()
            .for_each(|(task, out)| {
                for (j, o) in out.chunks_exact_mut(m).enumerate() {
                    self.row_dots(&nibbles, task * ROWS_PER_TASK + j, x, o);
                }
            });
        for (r, d) in dots.chunks_exact(m).enumerate() {
            for (i, &v) in d.iter().enumerate() {
                y[i * rows + r] = MaybeUninit::new(v);
            }
        }
    }

    /// `out[i] = x[i] · W[r]` for every row `i` of `x`, in groups of 8, 4, 2 and 1 rows of `x`
    /// (each group decodes the row again from cache: the row is `cols / 2` bytes).
    fn row_dots(&self, nibbles: &Nibbles, r: usize, x: &[f32], out: &mut [f32]) {
        let (cols, m) = (self.cols, out.len());
        let mut i = 0;
        while i < m {
            let xs = &x[i * cols..];
            let o = &mut out[i..];
            i += match m - i {
                8.. => self.row_dots_n::<8>(nibbles, r, xs, o),
                4..=7 => self.row_dots_n::<4>(nibbles, r, xs, o),
                2 | 3 => self.row_dots_n::<2>(nibbles, r, xs, o),
                _ => self.row_dots_n::<1>(nibbles, r, xs, o),
            };
        }
    }

    /// `out[n] = x[n] · W[r]` for `n < N`; returns `N`. Up to 4 rows of `x`, each keeps two
    /// accumulators (even and odd groups of eight) so that one row has two fused multiply-add
    /// chains in flight; 8 rows keep one each (16 would not fit AVX2's registers).
    #[inline(always)]
    fn row_dots_n<const N: usize>(
        &self,
        nibbles: &Nibbles,
        r: usize,
        x: &[f32],
        out: &mut [f32],
    ) -> usize {
        let (cols, bs) = (self.cols, self.blocksize);
        assert!(x.len() >= N * cols && out.len() >= N);
        let split = N <= 4;
        let start = r * cols;
        let mut even = [F8::zero(); N];
        let mut odd = [F8::zero(); N];
        let xp = x.as_ptr();
        let mut e = start;
        while e < start + cols {
            // one block's part of the row: every group of 8 in it shares one scale
            let end = ((e / bs + 1) * bs).min(start + cols);
            let scale = self.absmax[e / bs];
            let bytes = &self.packed[e / 2..end / 2];
            let mut pairs = bytes.chunks_exact(8);
            let mut g = e - start;
            for b in pairs.by_ref() {
                let w0 = nibbles.dequant8(&b[..4], scale);
                let w1 = nibbles.dequant8(&b[4..], scale);
                for n in 0..N {
                    // SAFETY: g + 16 <= cols (the pair lies in row r) and x holds N rows of
                    // cols (asserted above).
                    let (x0, x1) = unsafe {
                        let p = xp.add(n * cols + g);
                        (F8::load_ptr(p), F8::load_ptr(p.add(8)))
                    };
                    if split {
                        even[n] = even[n].fma(w0, x0);
                        odd[n] = odd[n].fma(w1, x1);
                    } else {
                        even[n] = even[n].fma(w0, x0).fma(w1, x1);
                    }
                }
                g += 16;
            }
            let rest = pairs.remainder();
            if !rest.is_empty() {
                let w0 = nibbles.dequant8(rest, scale);
                for (n, acc) in even.iter_mut().enumerate() {
                    // SAFETY: as above, g + 8 <= cols.
                    *acc = acc.fma(w0, unsafe { F8::load_ptr(xp.add(n * cols + g)) });
                }
            }
            e = end;
        }
        for n in 0..N {
            out[n] = even[n].sum() + odd[n].sum();
        }
        N
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::blockwise::{dequantize_4bit_ref, quantize_4bit, QuantType};
    use crate::quant::kernels::tests::sample;

    /// Against an f64 product with the reference dequantization, for every row count up to
    /// MAX_ROWS (each group size and their mixes), block sizes that split rows and rows that
    /// split blocks, and a row count that leaves a partial parallel task.
    #[test]
    fn rows_route_equals_reference_product() {
        for (rows, cols, blocksize, qt) in [
            (ROWS_PER_TASK + 3, 96, 64, QuantType::Nf4),
            (5, 40, 32, QuantType::Fp4),
            (9, 24, 64, QuantType::Nf4),
            (130, 256, 128, QuantType::Nf4),
        ] {
            let code = qt.code();
            let (packed, absmax) = quantize_4bit(&sample(rows * cols, 1), qt, blocksize).unwrap();
            let mut wd = vec![0f32; rows * cols];
            dequantize_4bit_ref(&packed, &absmax, &code, blocksize, &mut wd);
            let p = Packed4 {
                packed: &packed,
                absmax: &absmax,
                code: &code,
                blocksize,
                rows,
                cols,
            };
            assert!(p.rows_route_fits());
            for m in 0..=MAX_ROWS {
                let x = sample(m * cols, 2 + m as u64);
                let mut y = vec![MaybeUninit::new(f32::NAN); m * rows];
                p.matmul_t_rows(&x, m, &mut y);
                for i in 0..m {
                    for r in 0..rows {
                        // SAFETY: initialized above (NaN unless written)
                        let got = unsafe { y[i * rows + r].assume_init() } as f64;
                        let want: f64 = (0..cols)
                            .map(|c| x[i * cols + c] as f64 * wd[r * cols + c] as f64)
                            .sum();
                        assert!(
                            (got - want).abs() < 1e-5 * (1.0 + want.abs()),
                            "{rows}×{cols}/{blocksize}, m {m}: ({i}, {r}) {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn odd_widths_do_not_fit() {
        let code = QuantType::Nf4.code();
        let p = Packed4 {
            packed: &[0; 8],
            absmax: &[1.0; 4],
            code: &code,
            blocksize: 4,
            rows: 2,
            cols: 8,
        };
        assert!(!p.rows_route_fits(), "block of 4");
        let p = Packed4 { blocksize: 0, ..p };
        assert!(!p.rows_route_fits(), "block of 0");
        let p = Packed4 {
            blocksize: 64,
            cols: 6,
            ..p
        };
        assert!(!p.rows_route_fits(), "rows of 6");
    }
}
