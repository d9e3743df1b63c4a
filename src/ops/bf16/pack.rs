//! Fast routes of [`PairRows::pack_pairs`](super::PairRows::pack_pairs) for views that lie
//! contiguously in memory along one axis: the two layouts every training product's operands
//! take (an activation `x` read as `xᵀ`, a weight as `W` or `Wᵀ`).
//!
//! Element-by-element packing (bounds and edge checks per value, a strided store per pair)
//! cost about 3 ns a pair on Zen 4: on one thread, a tenth of a 2048³ product's time and a
//! fifth of a 1024³ one's. Here each loop walks memory in order with no per-element checks, so
//! the rounding to bf16 vectorizes.

use std::cell::RefCell;

use crate::ops::lanes::F8;

/// One run's pairs into `slots`: `slots[p]` = `(run[2p], run[2p + 1])`, the high half zero
/// past an odd end and the slots past the run zero (`run` holds at most `2·slots.len()`
/// values); `bits` rounds one element to bf16 bits. One column of a left panel laid out by
/// rows, or one scratch row of [`pairs_along_runs`].
pub(super) fn run_pairs<T: Copy>(run: &[T], bits: impl Fn(T) -> u16, slots: &mut [u32]) {
    let pairs = run.chunks_exact(2);
    let last = pairs.remainder().first().map_or(0, |&v| bits(v) as u32);
    let full = pairs.len();
    for (s, v) in slots.iter_mut().zip(pairs) {
        *s = bits(v[0]) as u32 | (bits(v[1]) as u32) << 16;
    }
    if full < slots.len() {
        slots[full] = last;
        slots[full + 1..].fill(0);
    }
}

/// Pairs along contiguous runs: `out[p·width + j]` = `(run_j[2p], run_j[2p + 1])` for
/// `j < runs.len()`, the high half zero past a run's odd end, and zero for `p` past a run's
/// end and in slots `runs.len()..width`. The runs are the reduction axis of a view with row
/// stride 1 (a transposed row-major matrix); `bits` rounds one element to bf16 bits.
///
/// Each run is first turned into pairs in a scratch row (contiguous in and out, so the rounding
/// vectorizes), then the scratch rows are interleaved into `out`. The scratch is kept per
/// thread: the attention core packs thousands of small panels a step, and allocating and
/// zeroing it each time had cost as much as the interleave.
pub(super) fn pairs_along_runs<T: Copy>(
    runs: &[&[T]],
    bits: impl Fn(T) -> u16,
    kp: usize,
    width: usize,
    out: &mut [u32],
) {
    let nj = runs.len();
    assert!(nj <= width && out.len() >= kp * width && runs.iter().all(|r| r.len() <= 2 * kp));
    if kp == 0 {
        return;
    }
    let out = &mut out[..kp * width];
    RUN_SCRATCH.with_borrow_mut(|scratch| {
        if scratch.len() < nj * kp {
            scratch.resize(nj * kp, 0);
        }
        let scratch = &mut scratch[..nj * kp];
        for (row, run) in scratch.chunks_exact_mut(kp).zip(runs) {
            run_pairs(run, &bits, row);
        }
        interleave(scratch, nj, kp, width, out);
    });
    if nj < width {
        for slot in out.chunks_exact_mut(width) {
            slot[nj..].fill(0);
        }
    }
}

/// `out[p·width + j] = scratch[j·kp + p]` for `j < nj`, `p < kp`: the scratch rows written
/// down the columns of `out`, as 8 × 8 transposes of lanes where whole blocks fit (the scalar
/// strided stores had cost half as much as the attention core's products; the lanes carry the
/// bits, so any u32 passes unchanged).
fn interleave(scratch: &[u32], nj: usize, kp: usize, width: usize, out: &mut [u32]) {
    assert!(scratch.len() >= nj * kp && out.len() >= kp * width && nj <= width);
    let (nj8, kp8) = (nj / 8 * 8, kp / 8 * 8);
    for j0 in (0..nj8).step_by(8) {
        for p0 in (0..kp8).step_by(8) {
            // SAFETY: rows j0..j0 + 8 ≤ nj of the scratch hold pairs p0..p0 + 8 ≤ kp, and
            // rows p0..p0 + 8 of `out` hold slots j0..j0 + 8 ≤ width (asserted above); u32
            // and f32 have the same size and alignment, and the lanes move bits unchanged.
            unsafe {
                let rows: [F8; 8] = std::array::from_fn(|r| {
                    F8::load_ptr(scratch.as_ptr().add((j0 + r) * kp + p0).cast())
                });
                for (c, v) in F8::transpose(rows).into_iter().enumerate() {
                    v.store_ptr(out.as_mut_ptr().add((p0 + c) * width + j0).cast());
                }
            }
        }
        for j in j0..j0 + 8 {
            for p in kp8..kp {
                out[p * width + j] = scratch[j * kp + p];
            }
        }
    }
    for (j, row) in scratch[..nj * kp]
        .chunks_exact(kp.max(1))
        .enumerate()
        .skip(nj8)
    {
        for (o, &v) in out[j..].iter_mut().step_by(width).zip(row) {
            *o = v;
        }
    }
}

thread_local! {
    /// [`pairs_along_runs`]'s scratch rows, kept from one call to the next.
    static RUN_SCRATCH: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
}

/// Pairs across rows: `out[p·width + j]` = `(row(k0 + 2p)[j], row(k0 + 2p + 1)[j])` for the
/// `rows` rows of a view with column stride 1 (a row-major matrix read as `W`), where `row(r)`
/// is row `r`'s slice of the block's columns (all the same length, at most `width`); the high
/// halves zero past the last row, whole slots zero past it, zero in the slots past the columns.
pub(super) fn pairs_across_rows<'a, T: Copy + 'a>(
    row: impl Fn(usize) -> &'a [T],
    rows: usize,
    k0: usize,
    bits: impl Fn(T) -> u16,
    width: usize,
    out: &mut [u32],
) {
    for (p, slot) in out.chunks_exact_mut(width).enumerate() {
        let r = k0 + 2 * p;
        if r >= rows {
            slot.fill(0);
            continue;
        }
        let lo = row(r);
        let nj = lo.len();
        if r + 1 < rows {
            for ((s, &l), &h) in slot.iter_mut().zip(lo).zip(&row(r + 1)[..nj]) {
                *s = bits(l) as u32 | (bits(h) as u32) << 16;
            }
        } else {
            for (s, &l) in slot.iter_mut().zip(lo) {
                *s = bits(l) as u32;
            }
        }
        slot[nj..].fill(0);
    }
}

#[cfg(test)]
mod tests {
    use super::interleave;

    /// The blocked interleave writes what the plain strided loop writes, on every mix of whole
    /// 8 × 8 blocks and tails in both directions, and leaves the slots past `nj` alone.
    #[test]
    fn interleave_matches_the_strided_loop() {
        for (nj, kp, width) in [(0, 5, 8), (3, 3, 8), (8, 8, 8), (9, 17, 16), (16, 24, 32)] {
            let scratch: Vec<u32> = (0..nj * kp)
                .map(|i| 0x9e37_79b9u32.wrapping_mul(i as u32 + 1))
                .collect();
            let mut fast = vec![7u32; kp * width];
            let mut slow = vec![7u32; kp * width];
            interleave(&scratch, nj, kp, width, &mut fast);
            for j in 0..nj {
                for p in 0..kp {
                    slow[p * width + j] = scratch[j * kp + p];
                }
            }
            assert_eq!(fast, slow, "nj={nj} kp={kp} width={width}");
        }
    }
}
