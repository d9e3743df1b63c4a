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
    ///
    /// A plain loop over fixed-size arrays, so that it compiles to a few 16-lane instructions
    /// (`array::map` had stayed an out-of-line call per block, 1.5 % of a QDoRA bf16 step).
    #[inline]
    fn block_bits(&self, b: usize) -> [u16; 16] {
        let a = self.w.absmax[b];
        let code: &[f32; 16] = self.w.code;
        let mut out = [0u16; 16];
        if self.dtype == Dtype::F16 {
            for (o, &c) in out.iter_mut().zip(code) {
                *o = to_bits(Dtype::F16.round(c * a));
            }
        } else {
            // bf16 twice is bf16 once: only f16 needs its own rounding first
            for (o, &c) in out.iter_mut().zip(code) {
                *o = to_bits(c * a);
            }
        }
        out
    }

    /// Decodes `out.len()` elements from flat index `start` on as bf16 bits, one block table at
    /// a time and, within a block, a byte (two codes, high nibble first) at a time.
    fn decode_bits(&self, start: usize, out: &mut [u16]) {
        self.decode_bits_with(start, out, true);
    }

    /// [`Self::decode_bits`], 32 codes at a time where `wide` allows it and the CPU can (see
    /// [`decode_wide`]); the tests turn it off to check the byte loop on any CPU.
    fn decode_bits_with(&self, start: usize, out: &mut [u16], wide: bool) {
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
            let done = decode_wide(bytes, &table, two, wide);
            for (o, &b) in two[2 * done..].chunks_exact_mut(2).zip(&bytes[done..]) {
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

/// Whether this CPU decodes codes 32 at a time (AVX-512 BW's 16-bit table lookup).
fn wide_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512bw")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Decodes the leading whole 16-byte groups of `bytes` (32 codes each, high nibble first)
/// through `table` into `out` where `wide` allows it and the CPU has AVX-512 BW; returns the
/// bytes done, which the caller finishes one at a time. Table lookups of the same bits as the
/// byte loop.
fn decode_wide(bytes: &[u8], table: &[u16; 16], out: &mut [u16], wide: bool) -> usize {
    let groups = bytes.len() / 16;
    assert!(out.len() >= 32 * groups);
    if !wide || groups == 0 || !wide_available() {
        return 0;
    }
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the CPU has AVX-512 BW (checked above); the slices cover `groups` groups
    // (asserted).
    unsafe {
        x86::decode_groups(&bytes[..16 * groups], table, &mut out[..32 * groups]);
        16 * groups
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("wide decoding is x86-64 only")
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// 16 bytes → 32 codes per step: each byte widened to a 32-bit lane holding its high
    /// nibble in the low half and its low nibble in the high half (the two codes' order in
    /// memory), then one 16-bit permute through the table's 16 entries.
    ///
    /// # Safety
    /// The CPU has AVX-512 F and BW; `out` holds twice as many elements as `bytes`, a multiple
    /// of 16.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn decode_groups(bytes: &[u8], table: &[u16; 16], out: &mut [u16]) {
        // SAFETY: 16 entries of 2 bytes are one 256-bit load.
        let t = _mm512_zextsi256_si512(unsafe { _mm256_loadu_si256(table.as_ptr().cast()) });
        let low = _mm512_set1_epi32(0x0f);
        for (b, o) in bytes.chunks_exact(16).zip(out.chunks_exact_mut(32)) {
            // SAFETY: `b` is 16 bytes and `o` 32 u16s (64 bytes).
            unsafe {
                let x = _mm512_cvtepu8_epi32(_mm_loadu_si128(b.as_ptr().cast()));
                let hi = _mm512_srli_epi32::<4>(x);
                let lo = _mm512_slli_epi32::<16>(_mm512_and_si512(x, low));
                let v = _mm512_permutexvar_epi16(_mm512_or_si512(hi, lo), t);
                _mm512_storeu_si512(o.as_mut_ptr().cast(), v);
            }
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

    /// The wide decoder (AVX-512 BW) writes the byte loop's bits, from odd and even starts,
    /// across block edges, with runs shorter and longer than its 32-code step.
    #[test]
    fn wide_decoding_matches_the_byte_loop() {
        if !wide_available() {
            println!("skipped: this CPU lacks AVX-512 BW (the byte loop is what runs here)");
            return;
        }
        let (out, inp) = (9, 320);
        let mut rng = Rng::new(6);
        let data: Vec<f32> = (0..out * inp).map(|_| rng.normal()).collect();
        let q =
            QuantizedWeight::quantize(&data, &[out, inp], Dtype::F32, QuantizeOptions::default())
                .unwrap();
        let pairs = Nf4Pairs::new(q.view(), Dtype::F32, false);
        for (start, len) in [
            (0, 64),
            (1, 95),
            (33, 200),
            (64, 31),
            (127, 700),
            (2000, 880),
        ] {
            let (mut wide, mut narrow) = (vec![0u16; len], vec![0u16; len]);
            pairs.decode_bits_with(start, &mut wide, true);
            pairs.decode_bits_with(start, &mut narrow, false);
            assert_eq!(wide, narrow, "start {start} len {len}");
        }
    }
}
