//! PEFT-form DoRA's second base product, taken at the dropped elements only.
//!
//! PEFT's DoRA with dropout multiplies the frozen weight by the dropped-out input as well as by
//! the input: `x_d·Wᵀ` next to `x·Wᵀ` in forward, and `g·W` for `g = (k−1)⊙dy` next to `dy·W`
//! in backward — twice the frozen products of every other mode. With dropout `p` = 0.1 only a
//! tenth of the elements differ between `x` and `x_d = c·M⊙x` (`c = 1/(1−p)`), so:
//!
//! - forward: `x_d·Wᵀ = c·(x·Wᵀ − (x⊙(1−M))·Wᵀ)`, the second product sparse on the left
//!   ([`forward`]);
//! - backward: `dy·W + c·M⊙(g·W) = (dy + c·g)·W − c·(1−M)⊙(g·W)`, one dense product and the
//!   second term sampled at the dropped elements ([`backward`]).
//!
//! Both sparse passes read a block of `W` decoded once into bf16 and held in L2 while every row
//! that drops an element of it is served: the forward a panel of `Wᵀ` pairs for a block of
//! output columns (a `vdpbf16ps` per dropped pair of inputs and 16 columns), the backward rows of
//! `Wᵀ` for a block of input features (a dot product along the outputs per dropped element).
//! The dropped elements are listed from the dropout's counter-based mask, which is never stored.
//!
//! Operands are bf16 and sums f32, as in the dense products; what differs from two dense
//! products is where bf16 rounding falls: `x_d`'s elements are `c·bf16(x)` here against
//! `bf16(c·x)`, and `dy + c·g` is rounded as one operand (`g` alone for the sampled term).
//! The tests bound both passes against f64 sums, and the layer against the same layer in f32.

use std::cell::RefCell;

use rayon::prelude::*;

use super::pack::run_pairs;
use super::{from_bits, to_bits, Bf16Kernel, PairRows};
use crate::ops::mask::KeepMask;
use crate::ops::par::PAR_CHUNK;

/// Bytes of decoded weight one block of a sparse pass holds (with the streamed rows, within a
/// Zen 4 core's 1 MiB L2).
const BLOCK_BYTES: usize = 384 << 10;

/// Whether the sparse route pays on this CPU: `vdpbf16ps` without AMX. (Where AMX computes the
/// dense products, a second dense product costs a fraction of what it does here; the sparse
/// passes were not measured there.)
pub fn pays() -> bool {
    Bf16Kernel::selected() == Bf16Kernel::Avx512Bf16
}

/// The dropped elements of an `n × inp` input, by pairs of input features: for each row, the
/// pairs `(2q, 2q + 1)` holding at least one dropped element, ascending, each entry
/// `q << 2 | lo | hi << 1` (`lo`/`hi`: element `2q`/`2q + 1` dropped), and, when the input is
/// given, each entry's dropped values as a bf16 pair (a kept half zero).
struct Dropped {
    /// The rows in blocks of [`Self::ROWS`], each block's lists built apart.
    parts: Vec<Part>,
    /// Row `i`'s first entry counted over all rows (where its slots start in arrays laid out
    /// in entry order); `start[n]` is the number of entries.
    start: Vec<usize>,
}

/// The lists of one block of rows.
struct Part {
    entries: Vec<u32>,
    values: Vec<u32>,
    /// Where each row's entries end within the block.
    ends: Vec<usize>,
}

impl Dropped {
    /// Rows per block of the listing.
    const ROWS: usize = 16;

    /// Lists the dropped elements of `mask` over `n` rows of `inp` (the mask's element `e` is
    /// `i·inp + j`, as dropout applies it), with their values in `x` if given, in parallel over
    /// blocks of rows.
    fn list(mask: &KeepMask, n: usize, inp: usize, x: Option<&[f32]>) -> Self {
        const ROWS: usize = Dropped::ROWS;
        let parts: Vec<Part> = (0..n.div_ceil(ROWS))
            .into_par_iter()
            .map(|b| {
                let rows = b * ROWS..((b + 1) * ROWS).min(n);
                let kp = inp.div_ceil(2);
                // room for every pair of every row, plus the slots written past the last entry
                let mut entries = vec![0u32; rows.len() * kp + 4];
                let mut len = 0;
                let mut ends = Vec::with_capacity(rows.len());
                let whole = inp / 8;
                for i in rows.clone() {
                    let e0 = i * inp;
                    for c in 0..inp.div_ceil(8) {
                        let byte = if c < whole {
                            mask.dropped8(e0 + 8 * c)
                        } else {
                            (8 * c..inp)
                                .fold(0u8, |m, j| m | u8::from(!mask.kept(e0 + j)) << (j - 8 * c))
                        };
                        // the byte's four pairs, each written and kept if it drops anything
                        // (no branch on the random bits)
                        let q0 = 4 * c as u32;
                        for k in 0..4 {
                            let pair = (byte >> (2 * k)) as u32 & 3;
                            entries[len] = (q0 + k) << 2 | pair;
                            len += usize::from(pair != 0);
                        }
                    }
                    ends.push(len);
                }
                entries.truncate(len);
                let values = x.map_or_else(Vec::new, |x| {
                    let mut at = 0;
                    let mut values = Vec::with_capacity(len);
                    for (i, &end) in rows.zip(&ends) {
                        let row = &x[i * inp..(i + 1) * inp];
                        values.extend(entries[at..end].iter().map(|&e| {
                            let j = 2 * (e >> 2) as usize;
                            let lo = to_bits(row[j]) as u32 * (e & 1);
                            let hi =
                                row.get(j + 1).map_or(0, |&v| to_bits(v) as u32) * (e >> 1 & 1);
                            lo | hi << 16
                        }));
                        at = end;
                    }
                    values
                });
                Part {
                    entries,
                    values,
                    ends,
                }
            })
            .collect();
        let mut start = Vec::with_capacity(n + 1);
        start.push(0);
        for p in &parts {
            let base = start[start.len() - 1];
            start.extend(p.ends.iter().map(|&e| base + e));
        }
        Dropped { parts, start }
    }

    /// Row `i`'s entries, and their values if the input was given.
    fn row(&self, i: usize) -> (&[u32], &[u32]) {
        let p = &self.parts[i / Self::ROWS];
        let r = i % Self::ROWS;
        let from = if r == 0 { 0 } else { p.ends[r - 1] };
        let to = p.ends[r];
        (&p.entries[from..to], p.values.get(from..to).unwrap_or(&[]))
    }
}

/// `x_d·Wᵀ (n × out)` from `y = x·Wᵀ`: `c·(y − (x⊙(1−M))·Wᵀ)`, `x_d = c·M⊙x` the dropped-out
/// input, `wt` = `Wᵀ (in × out)` (as the forward product reads it), `x` rounded to bf16 as the
/// dense product rounds it.
///
/// # Panics
/// If the lengths do not match `n` and `wt`'s shape.
pub fn forward(x: &[f32], y: &[f32], n: usize, wt: &dyn PairRows, mask: &KeepMask) -> Vec<f32> {
    forward_with(x, y, n, wt, mask, native())
}

fn forward_with(
    x: &[f32],
    y: &[f32],
    n: usize,
    wt: &dyn PairRows,
    mask: &KeepMask,
    native: bool,
) -> Vec<f32> {
    let (inp, out) = (wt.rows(), wt.cols());
    assert_eq!(x.len(), n * inp, "dropped forward: x is not {n} × {inp}");
    assert_eq!(y.len(), n * out, "dropped forward: y is not {n} × {out}");
    let c = mask.keep_scale();
    let dropped = Dropped::list(mask, n, inp, Some(x));
    let kp = inp.div_ceil(2);
    // output columns per block: 64 (measured against 16–128 on Zen 4: narrower blocks read
    // the entries more often, wider ones lose the panel from L2), fewer for a long input
    let width = [64, 32, 16]
        .into_iter()
        .find(|w| kp * w * 4 <= BLOCK_BYTES)
        .unwrap_or(16);
    let mut y2 = vec![0f32; n * out];
    let shared = Shared(y2.as_mut_ptr());
    (0..out.div_ceil(width)).into_par_iter().for_each(|b| {
        let (o0, nj) = (b * width, width.min(out - b * width));
        SCRATCH.with_borrow_mut(|[panel, _]| {
            panel.resize(kp * width, 0);
            wt.pack_pairs(0, kp, o0, nj, width, panel);
            let mut sums = vec![0f32; width];
            for i in 0..n {
                let (entries, values) = dropped.row(i);
                row_sums(panel, width, entries, values, native, &mut sums);
                // SAFETY: block b alone writes columns o0..o0 + nj of the n × out output, and
                // row i's run of them lies inside it.
                let dst = unsafe { std::slice::from_raw_parts_mut(shared.at(i * out + o0), nj) };
                dst.copy_from_slice(&sums[..nj]);
            }
        });
    });
    // x_d·Wᵀ = c·(y − (x⊙(1−M))·Wᵀ), row-major (y read in order, not in the blocks' strips)
    y2.par_chunks_mut(PAR_CHUNK)
        .zip(y.par_chunks(PAR_CHUNK))
        .for_each(|(d, y)| d.iter_mut().zip(y).for_each(|(d, &y)| *d = c * (y - *d)));
    y2
}

/// `dy·W + c·M⊙(g·W)` (PEFT-form DoRA's input gradient through the base: `dy·W` from `y`, the
/// second term from `x_d`) as `(dy + c·g)·W − c·(1−M)⊙(g·W)`: `g` is rounded to bf16, then
/// replaced by `dy + c·g` and handed to `dense` (`· W`, the caller's product), whose result has
/// the sampled term taken off at the dropped elements. `w` is `W (out × in)` (as the backward
/// product reads it).
///
/// # Panics
/// If the lengths do not match `n` and `w`'s shape.
pub fn backward(
    dy: &[f32],
    g: &mut [f32],
    n: usize,
    w: &dyn PairRows,
    mask: &KeepMask,
    dense: impl FnOnce(&[f32]) -> Vec<f32>,
) -> Vec<f32> {
    backward_with(dy, g, n, w, mask, dense, native())
}

fn backward_with(
    dy: &[f32],
    g: &mut [f32],
    n: usize,
    w: &dyn PairRows,
    mask: &KeepMask,
    dense: impl FnOnce(&[f32]) -> Vec<f32>,
    native: bool,
) -> Vec<f32> {
    let (out, inp) = (w.rows(), w.cols());
    assert_eq!(dy.len(), n * out, "dropped backward: dy is not {n} × {out}");
    assert_eq!(g.len(), n * out, "dropped backward: g is not {n} × {out}");
    let c = mask.keep_scale();
    // g's rows in bf16 pairs along the outputs, padded to whole vectors of 16 pairs
    let ld = out.div_ceil(32) * 16;
    let mut gb = vec![0u32; n * ld];
    gb.par_chunks_mut(ld)
        .zip(g.par_chunks_mut(out))
        .zip(dy.par_chunks(out))
        .for_each(|((b, g), d)| {
            run_pairs(g, to_bits, b);
            g.iter_mut().zip(d).for_each(|(g, &d)| *g = d + c * *g);
        });
    let mut dx = dense(g);
    assert_eq!(
        dx.len(),
        n * inp,
        "dropped backward: dense product is not {n} × {inp}"
    );
    let dropped = Dropped::list(mask, n, inp, None);
    // input features per block, even, the blocks a multiple of the threads
    let threads = rayon::current_num_threads().max(1);
    let per = (BLOCK_BYTES / (4 * ld)).max(2);
    let blocks = inp.div_ceil(per).div_ceil(threads) * threads;
    let jb = inp.div_ceil(blocks).div_ceil(2) * 2;
    // the sampled sums, two slots per entry (its pair's elements) in the entries' order
    let mut sums = vec![0f32; 2 * dropped.start[n]];
    let shared = Shared(sums.as_mut_ptr());
    (0..inp.div_ceil(jb)).into_par_iter().for_each(|b| {
        let (j0, nj) = (b * jb, jb.min(inp - b * jb));
        SCRATCH.with_borrow_mut(|[rows, slab]| {
            decoded_columns(w, j0, nj, ld, rows, slab);
            let (q0, q1) = ((j0 / 2) as u32, (j0 + nj).div_ceil(2) as u32);
            for i in 0..n {
                let (at, row) = (dropped.start[i], dropped.row(i).0);
                let from = row.partition_point(|&e| e >> 2 < q0);
                let to = row.partition_point(|&e| e >> 2 < q1);
                let gi = &gb[i * ld..(i + 1) * ld];
                for (k, &e) in row.iter().enumerate().take(to).skip(from) {
                    for h in 0..2 {
                        if e & (1 << h) != 0 {
                            let j = 2 * (e >> 2) as usize + h;
                            let s = dot(gi, &rows[(j - j0) * ld..][..ld], native);
                            // SAFETY: block b alone holds the entries of pairs q0..q1, and
                            // slot 2·(at + k) + h is inside `sums`.
                            unsafe { *shared.at(2 * (at + k) + h) = s };
                        }
                    }
                }
            }
        });
    });
    // dx −= c·(g·W) at the dropped elements, row by row
    dx.par_chunks_mut(inp).enumerate().for_each(|(i, dx)| {
        let at = dropped.start[i];
        for (k, &e) in dropped.row(i).0.iter().enumerate() {
            let j = 2 * (e >> 2) as usize;
            dx[j] -= c * sums[2 * (at + k)];
            if e & 2 != 0 {
                dx[j + 1] -= c * sums[2 * (at + k) + 1];
            }
        }
    });
    dx
}

thread_local! {
    /// Each thread's decoded block of the weight and its packing slab, kept from one call to
    /// the next (fresh buffers faulted their pages in on every call).
    static SCRATCH: RefCell<[Vec<u32>; 2]> = const { RefCell::new([Vec::new(), Vec::new()]) };
}

/// The output of a sparse pass, shared by blocks that write disjoint parts of it.
struct Shared(*mut f32);

// SAFETY: each block writes only its own part (see the writes).
unsafe impl Sync for Shared {}
// SAFETY: as above.
unsafe impl Send for Shared {}

impl Shared {
    /// The address of element `e`.
    ///
    /// # Safety
    /// `e` lies in the output, and no other block writes it.
    unsafe fn at(&self, e: usize) -> *mut f32 {
        // SAFETY: the caller's contract.
        unsafe { self.0.add(e) }
    }
}

/// Columns `j0..j0 + nj` of `W (out × in)` into `rows`, one after the other `ld` apart, each
/// in bf16 pairs along the outputs (zero past them): `W` packed 16 output pairs at a time
/// into `slab` (rows decoded along their runs), then each column's 16 pairs, one cache line,
/// copied out.
fn decoded_columns(
    w: &dyn PairRows,
    j0: usize,
    nj: usize,
    ld: usize,
    rows: &mut Vec<u32>,
    slab: &mut Vec<u32>,
) {
    const P: usize = 16;
    let kp = w.rows().div_ceil(2);
    rows.clear();
    rows.resize(nj * ld, 0);
    slab.resize(P * nj, 0);
    for p0 in (0..kp).step_by(P) {
        let np = P.min(kp - p0);
        w.pack_pairs(2 * p0, np, j0, nj, nj, &mut slab[..np * nj]);
        for (j, dst) in rows.chunks_exact_mut(ld).enumerate() {
            for (p, d) in dst[p0..p0 + np].iter_mut().enumerate() {
                *d = slab[p * nj + j];
            }
        }
    }
}

/// `sums[..width]` = Σ over a row's entries of the entry's value pair times the panel's pair
/// row: the row's `(x⊙(1−M))·Wᵀ` over the panel's columns (`width` slots per pair).
fn row_sums(
    panel: &[u32],
    width: usize,
    entries: &[u32],
    values: &[u32],
    native: bool,
    sums: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if native {
        debug_assert!(entries
            .iter()
            .all(|&e| ((e >> 2) as usize) < panel.len() / width));
        // SAFETY: `native` is only true where the CPU has AVX512F and AVX512_BF16; every
        // entry indexes a pair row of the panel (the list holds pairs of the input's features,
        // and the panel all of them) and `width` is 16·NB.
        unsafe {
            match width {
                16 => x86::row_sums::<1, 8>(panel, entries, values, sums),
                32 => x86::row_sums::<2, 4>(panel, entries, values, sums),
                64 => x86::row_sums::<4, 2>(panel, entries, values, sums),
                _ => unreachable!("panel width {width}"),
            }
        }
        return;
    }
    let _ = native;
    sums.fill(0.0);
    for (&e, &v) in entries.iter().zip(values) {
        let (a, b) = (from_bits(v as u16), from_bits((v >> 16) as u16));
        let row = &panel[(e >> 2) as usize * width..][..width];
        for (s, &w) in sums.iter_mut().zip(row) {
            *s += a * from_bits(w as u16) + b * from_bits((w >> 16) as u16);
        }
    }
}

/// `Σ a[o]·b[o]` over two rows of bf16 pairs, a whole number of 16-pair vectors.
fn dot(a: &[u32], b: &[u32], native: bool) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if native {
        // SAFETY: `native` is only true where the CPU has AVX512F and AVX512_BF16 (the lengths
        // are checked inside).
        return unsafe { x86::dot(a, b) };
    }
    let _ = native;
    a.iter()
        .zip(b)
        .map(|(&a, &b)| {
            let (a0, a1) = (from_bits(a as u16), from_bits((a >> 16) as u16));
            a0 * from_bits(b as u16) + a1 * from_bits((b >> 16) as u16)
        })
        .sum()
}

/// Whether this CPU runs the `vdpbf16ps` passes.
fn native() -> bool {
    Bf16Kernel::Avx512Bf16.available()
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::super::packed::x86::dot_bf16 as dp;

    /// [`super::row_sums`] for `16·NB` columns, the entries dealt in turn to `S` sets of sums
    /// (so that `S·NB` chains of `vdpbf16ps` run at once: one chain waits on its latency).
    ///
    /// # Safety
    /// The CPU has AVX512F and AVX512_BF16; every entry's pair index `q` has
    /// `panel[q·16·NB..(q + 1)·16·NB]` in bounds; `sums` holds `16·NB`.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn row_sums<const NB: usize, const S: usize>(
        panel: &[u32],
        entries: &[u32],
        values: &[u32],
        sums: &mut [f32],
    ) {
        let w = 16 * NB;
        assert!(sums.len() >= w && values.len() >= entries.len());
        let mut acc = [[_mm512_setzero_ps(); NB]; S];
        let p = panel.as_ptr();
        let step = |acc: &mut [__m512; NB], e: u32, v: u32| {
            let row = (e >> 2) as usize * w;
            let bv = _mm512_set1_epi32(v as i32);
            for (t, a) in acc.iter_mut().enumerate() {
                // SAFETY: the caller's bound on the entry's pair row.
                let pv = unsafe { _mm512_loadu_si512(p.add(row + 16 * t).cast()) };
                *a = dp(*a, bv, pv);
            }
        };
        let whole = entries.len() / S * S;
        for (es, vs) in entries[..whole].chunks_exact(S).zip(values.chunks_exact(S)) {
            for ((a, &e), &v) in acc.iter_mut().zip(es).zip(vs) {
                step(a, e, v);
            }
        }
        for (k, (&e, &v)) in entries[whole..].iter().zip(&values[whole..]).enumerate() {
            step(&mut acc[k], e, v);
        }
        for t in 0..NB {
            let mut s = acc[0][t];
            for a in &acc[1..] {
                s = _mm512_add_ps(s, a[t]);
            }
            // SAFETY: sums holds 16·NB (checked above).
            unsafe { _mm512_storeu_ps(sums.as_mut_ptr().add(16 * t), s) };
        }
    }

    /// `Σ a[o]·b[o]` over rows of bf16 pairs of the same length, a multiple of 16.
    ///
    /// # Safety
    /// The CPU has AVX512F and AVX512_BF16.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn dot(a: &[u32], b: &[u32]) -> f32 {
        assert!(a.len() == b.len() && a.len().is_multiple_of(16));
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc = [_mm512_setzero_ps(); 4];
        let steps = a.len() / 16;
        let mut s = 0;
        while s + 4 <= steps {
            for (t, acc) in acc.iter_mut().enumerate() {
                // SAFETY: (s + t)·16 + 16 ≤ len.
                let (x, y) = unsafe {
                    (
                        _mm512_loadu_si512(pa.add(16 * (s + t)).cast()),
                        _mm512_loadu_si512(pb.add(16 * (s + t)).cast()),
                    )
                };
                *acc = dp(*acc, x, y);
            }
            s += 4;
        }
        while s < steps {
            // SAFETY: s·16 + 16 ≤ len.
            let (x, y) = unsafe {
                (
                    _mm512_loadu_si512(pa.add(16 * s).cast()),
                    _mm512_loadu_si512(pb.add(16 * s).cast()),
                )
            };
            acc[0] = dp(acc[0], x, y);
            s += 1;
        }
        let s = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
        _mm512_reduce_add_ps(s)
    }
}

#[cfg(test)]
mod tests;
