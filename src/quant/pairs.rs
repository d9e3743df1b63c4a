//! A 4-bit weight as an operand of the bf16 products: its codes decoded straight into bf16 pair
//! panels (`ops::bf16::PairRows`), so no f32 tile of the weight is ever written — half the tile
//! traffic of the f32 route. Values are `code · absmax` rounded to `quant_state.dtype` (as
//! `dequantize_4bit` returns them) and then to bf16, what bitsandbytes hands `F.linear` under
//! `bnb_4bit_compute_dtype=torch.bfloat16`.

use super::kernels::Packed4;
use super::Dtype;
use crate::ops::bf16::{to_bits, PairRows};

/// `W (out × in)` or `Wᵀ` over a 4-bit view.
pub struct Nf4Pairs<'a> {
    w: Packed4<'a>,
    dtype: Dtype,
    transposed: bool,
    shift: u32,
}

impl<'a> Nf4Pairs<'a> {
    /// `W` itself (`out × in`: the backward's `dy·W`) or, `transposed`, `Wᵀ` (`in × out`: the
    /// forward's `x·Wᵀ`).
    ///
    /// # Panics
    /// If the codes or scales do not cover the matrix, or the block size is not a power of two.
    pub fn new(w: Packed4<'a>, dtype: Dtype, transposed: bool) -> Self {
        w.assert_covers_matrix();
        assert!(w.blocksize.is_power_of_two(), "block size {}", w.blocksize);
        let shift = w.blocksize.trailing_zeros();
        Nf4Pairs {
            w,
            dtype,
            transposed,
            shift,
        }
    }

    /// The 16 values of block `b` as bf16 bits: `code · absmax`, rounded to the stored dtype,
    /// then to bf16 (what `dequantize_4bit` returns, read in bf16), computed once per block of
    /// codes instead of once per element.
    #[inline]
    fn block_bits(&self, b: usize) -> [u16; 16] {
        let a = self.w.absmax[b];
        let mut v: [f32; 16] = std::array::from_fn(|n| self.w.code[n] * a);
        // bf16 twice is bf16 once: only f16 needs its own rounding first
        if self.dtype == Dtype::F16 {
            v.iter_mut().for_each(|x| *x = Dtype::F16.round(*x));
        }
        v.map(to_bits)
    }

    /// Decodes `out.len()` elements from flat index `start` on as bf16 bits, one block table at
    /// a time and, within a block, a byte (two codes, high nibble first) at a time.
    fn decode_bits(&self, start: usize, out: &mut [u16]) {
        let packed = self.w.packed;
        let mut i = start;
        let mut rest = out;
        while !rest.is_empty() {
            let block = i >> self.shift;
            let end = ((block + 1) << self.shift).min(i + rest.len());
            let table = self.block_bits(block);
            let (seg, tail) = std::mem::take(&mut rest).split_at_mut(end - i);
            rest = tail;
            let seg = if i & 1 == 1 {
                seg[0] = table[(packed[i >> 1] & 0x0f) as usize];
                i += 1;
                &mut seg[1..]
            } else {
                seg
            };
            let (two, last) = seg.split_at_mut(seg.len() & !1);
            let bytes = &packed[i >> 1..][..two.len() / 2];
            for (o, &b) in two.chunks_exact_mut(2).zip(bytes) {
                o[0] = table[(b >> 4) as usize];
                o[1] = table[(b & 0x0f) as usize];
            }
            if let Some(o) = last.first_mut() {
                *o = table[(packed[(i + two.len()) >> 1] >> 4) as usize];
            }
            i = end;
        }
    }
}

impl PairRows for Nf4Pairs<'_> {
    fn rows(&self) -> usize {
        if self.transposed {
            self.w.cols
        } else {
            self.w.rows
        }
    }

    fn cols(&self) -> usize {
        if self.transposed {
            self.w.rows
        } else {
            self.w.cols
        }
    }

    fn bits(&self, i: usize, j: usize) -> u16 {
        let (r, c) = if self.transposed { (j, i) } else { (i, j) };
        let mut v = [0u16];
        self.decode_bits(r * self.w.cols + c, &mut v);
        v[0]
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
        let (rows, cols) = (self.rows(), self.w.cols);
        let out = &mut out[..kp * width];
        out.fill(0);
        if self.transposed {
            // Wᵀ's column j is W's row j0 + j: one run of 2·kp codes along it.
            let len = (2 * kp).min(rows.saturating_sub(k0));
            let mut run = vec![0u16; 2 * kp];
            for j in 0..nj {
                self.decode_bits((j0 + j) * cols + k0, &mut run[..len]);
                run[len..].fill(0);
                for (p, v) in run.chunks_exact(2).enumerate() {
                    out[p * width + j] = v[0] as u32 | (v[1] as u32) << 16;
                }
            }
        } else {
            // W's rows k0 + 2p and k0 + 2p + 1, columns j0..j0 + nj.
            let (mut lo, mut hi) = (vec![0u16; nj], vec![0u16; nj]);
            for p in 0..kp {
                let r = k0 + 2 * p;
                if r >= rows {
                    break;
                }
                self.decode_bits(r * cols + j0, &mut lo);
                if r + 1 < rows {
                    self.decode_bits((r + 1) * cols + j0, &mut hi);
                } else {
                    hi.fill(0);
                }
                for (o, (&l, &h)) in out[p * width..][..nj].iter_mut().zip(lo.iter().zip(&hi)) {
                    *o = l as u32 | (h as u32) << 16;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::Rng;
    use crate::quant::{QuantType, QuantizeOptions, QuantizedWeight};

    /// The packed pairs hold, bit for bit, `dequantize_4bit`'s values (rounded to the stored
    /// dtype) rounded to bf16, for `W` and `Wᵀ`, with an odd number of reduction rows (the last
    /// pair's high half is zero) and panels that start mid-matrix.
    #[test]
    fn pairs_hold_the_dequantized_values_in_bf16() {
        let (out, inp) = (13, 192);
        let mut rng = Rng::new(5);
        let data: Vec<f32> = (0..out * inp).map(|_| rng.normal()).collect();
        for (qt, dtype, dq) in [
            (QuantType::Nf4, Dtype::F32, true),
            (QuantType::Nf4, Dtype::Bf16, true),
            (QuantType::Fp4, Dtype::F16, false),
        ] {
            let opts = QuantizeOptions {
                quant_type: qt,
                blocksize: 64,
                double_quant: dq,
            };
            let q = QuantizedWeight::quantize(&data, &[out, inp], dtype, opts).unwrap();
            let want: Vec<u16> = q
                .dequantize_as_stored()
                .iter()
                .map(|&v| to_bits(v))
                .collect();
            // runs that start and end mid-byte and mid-block
            let flat = Nf4Pairs::new(q.view(), dtype, false);
            for (start, len) in [(1, 7), (63, 3), (5, 130), (0, 129), (64, 64)] {
                let mut got = vec![0u16; len];
                flat.decode_bits(start, &mut got);
                assert_eq!(
                    got,
                    want[start..start + len],
                    "{qt:?} {dtype:?} run {start}+{len}"
                );
            }
            for transposed in [false, true] {
                let p = Nf4Pairs::new(q.view(), dtype, transposed);
                let (rows, cols) = (p.rows(), p.cols());
                let at = |i: usize, j: usize| {
                    if transposed {
                        want[j * inp + i]
                    } else {
                        want[i * inp + j]
                    }
                };
                let (j0, nj, width) = (cols / 3, cols - cols / 3, cols);
                for k0 in (0..rows).step_by(6) {
                    let kp = 3;
                    let mut buf = vec![7u32; kp * width];
                    p.pack_pairs(k0, kp, j0, nj, width, &mut buf);
                    for pi in 0..kp {
                        for j in 0..nj {
                            let (r, c) = (k0 + 2 * pi, j0 + j);
                            let lo = if r < rows { at(r, c) } else { 0 };
                            let hi = if r + 1 < rows { at(r + 1, c) } else { 0 };
                            let w = buf[pi * width + j];
                            assert_eq!(
                                (w as u16, (w >> 16) as u16),
                                (lo, hi),
                                "{qt:?} {dtype:?} transposed={transposed} ({r}, {c})"
                            );
                            assert_eq!(p.bits(r.min(rows - 1), c), at(r.min(rows - 1), c));
                        }
                    }
                }
            }
        }
    }
}
