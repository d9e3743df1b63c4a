//! Output buffers allocated without the zeroing pass of `vec![0.0; len]`.
//!
//! That pass (calloc's memset of reused heap memory, or the kernel zeroing fresh pages) cost as
//! much as the pass that then overwrote the buffer: ≈ 0.35 s of a 7 s QDoRA step over the
//! layers' outputs and input gradients. Two kinds of helpers:
//!
//! - safe builders for the layers ([`new_rows`], [`new_rows_with`]): each output row is a
//!   [`Row`] that must be filled whole, once; the builder checks that every row was filled
//!   before the vector exists, so nothing unwritten can ever be read;
//! - `unsafe` ones for the kernels in `ops` and `quant` ([`filled`], [`filled_pair`],
//!   [`new_matrix`]), whose callers vouch that their products write every element.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::mat::MatMut;

/// Rows per parallel task of [`new_rows`] and [`new_rows_with`].
const ROWS_PER_TASK: usize = 16;

/// A `len`-float vector that `fill` writes, allocated without zeroing.
///
/// # Safety
/// `fill` must write every element of the slice it is given before it returns.
pub(crate) unsafe fn filled(len: usize, fill: impl FnOnce(&mut [MaybeUninit<f32>])) -> Vec<f32> {
    let mut v = Vec::with_capacity(len);
    fill(&mut v.spare_capacity_mut()[..len]);
    // SAFETY: all `len` elements are initialized (the caller's contract).
    unsafe { v.set_len(len) };
    v
}

/// Two vectors that `fill` writes together (products that share one pass over a weight).
///
/// # Safety
/// `fill` must write every element of both slices before it returns.
pub(crate) unsafe fn filled_pair(
    len_a: usize,
    len_b: usize,
    fill: impl FnOnce(&mut [MaybeUninit<f32>], &mut [MaybeUninit<f32>]),
) -> (Vec<f32>, Vec<f32>) {
    let mut b = Vec::new();
    // SAFETY: `fill` writes every element of both (the caller's contract).
    let a = unsafe { filled(len_a, |a| b = filled(len_b, |b| fill(a, b))) };
    (a, b)
}

/// A new row-major `rows × cols` matrix that `fill` writes through a view of unwritten memory.
///
/// # Safety
/// `fill` must write every element of the view (e.g. with products that overwrite it whole).
pub(crate) unsafe fn new_matrix(
    rows: usize,
    cols: usize,
    fill: impl FnOnce(MatMut<'_>),
) -> Vec<f32> {
    // SAFETY: `fill` writes every element of the rows × cols view (the caller's contract).
    unsafe {
        filled(rows * cols, |buf| {
            fill(MatMut::uninit(buf, rows, cols, cols))
        })
    }
}

/// One output row of [`new_rows`]: filled whole, once, by [`fill`](Row::fill).
pub struct Row<'a> {
    buf: &'a mut [MaybeUninit<f32>],
    done: &'a mut bool,
}

impl Row<'_> {
    /// Writes the row from `values` in order.
    ///
    /// # Panics
    /// If `values` does not yield exactly one value per element.
    #[inline(always)]
    pub fn fill(self, values: impl Iterator<Item = f32>) {
        let len = self.buf.len();
        let mut n = 0;
        for (d, v) in self.buf.iter_mut().zip(values) {
            d.write(v);
            n += 1;
        }
        assert_eq!(n, len, "a row of {len} elements got {n} values");
        *self.done = true;
    }
}

/// Calls `f(i, row)` for every row of a block that starts at row `first`, checking each row
/// was filled.
fn fill_block(
    block: &mut [MaybeUninit<f32>],
    width: usize,
    first: usize,
    mut f: impl FnMut(usize, Row<'_>),
) {
    for (k, row) in block.chunks_mut(width).enumerate() {
        let mut done = false;
        f(
            first + k,
            Row {
                buf: row,
                done: &mut done,
            },
        );
        assert!(done, "row {} was not filled", first + k);
    }
}

/// A new row-major `rows × width` matrix, row `i` written by `f(i, row)`, rows in parallel.
///
/// # Panics
/// If `f` leaves a row unfilled (before the matrix exists).
pub fn new_rows(rows: usize, width: usize, f: impl Fn(usize, Row<'_>) + Sync) -> Vec<f32> {
    let mut v = Vec::with_capacity(rows * width);
    if width > 0 {
        v.spare_capacity_mut()[..rows * width]
            .par_chunks_mut(width * ROWS_PER_TASK)
            .enumerate()
            .for_each(|(blk, block)| fill_block(block, width, blk * ROWS_PER_TASK, &f));
    }
    // SAFETY: every row of every block was filled whole (checked by `fill_block`).
    unsafe { v.set_len(rows * width) };
    v
}

/// [`new_rows`] that also hands `f` row `i` of `other` (the same shape) to update in place:
/// `f(i, other_row, row)`. (An output gradient overwritten by one result while another is
/// built, without a third buffer.)
///
/// # Panics
/// If `f` leaves a row unfilled, or `other` is not a whole number of rows.
pub fn new_rows_with(
    other: &mut [f32],
    width: usize,
    f: impl Fn(usize, &mut [f32], Row<'_>) + Sync,
) -> Vec<f32> {
    assert_eq!(other.len() % width.max(1), 0, "whole rows");
    let len = other.len();
    let mut v = Vec::with_capacity(len);
    if width > 0 {
        let chunk = width * ROWS_PER_TASK;
        v.spare_capacity_mut()[..len]
            .par_chunks_mut(chunk)
            .zip(other.par_chunks_mut(chunk))
            .enumerate()
            .for_each(|(blk, (block, mine))| {
                let mut rows = mine.chunks_mut(width);
                fill_block(block, width, blk * ROWS_PER_TASK, |i, row| {
                    let m = rows.next().expect("a row of `other` per output row");
                    f(i, m, row)
                });
            });
    }
    // SAFETY: every row of every block was filled whole (checked by `fill_block`).
    unsafe { v.set_len(len) };
    v
}

/// [`new_rows`] over fixed blocks of `block_rows` rows (the last one shorter), each block
/// folding a state of its own over its rows in order, `f(state, i, row)`, from `init()`:
/// returns the matrix and the blocks' states in block order. (A pass that writes one result and
/// sums another per row block: the fixed blocks keep the sums independent of the thread count.)
///
/// # Panics
/// If `f` leaves a row unfilled, or `block_rows` is 0.
pub fn new_rows_folded<T: Send>(
    rows: usize,
    width: usize,
    block_rows: usize,
    init: impl Fn() -> T + Sync,
    f: impl Fn(&mut T, usize, Row<'_>) + Sync,
) -> (Vec<f32>, Vec<T>) {
    assert!(block_rows > 0, "blocks of no rows");
    let mut v = Vec::with_capacity(rows * width);
    let states = if width > 0 {
        v.spare_capacity_mut()[..rows * width]
            .par_chunks_mut(width * block_rows)
            .enumerate()
            .map(|(blk, block)| {
                let mut state = init();
                fill_block(block, width, blk * block_rows, |i, row| {
                    f(&mut state, i, row)
                });
                state
            })
            .collect()
    } else {
        (0..rows.div_ceil(block_rows)).map(|_| init()).collect()
    };
    // SAFETY: every row of every block was filled whole (checked by `fill_block`).
    unsafe { v.set_len(rows * width) };
    (v, states)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folded_rows_keep_one_state_per_block_in_order() {
        let (rows, width) = (37, 3);
        let (v, sums) = new_rows_folded(
            rows,
            width,
            8,
            || 0usize,
            |s, i, row| {
                *s += i;
                row.fill((0..width).map(|j| (i * 10 + j) as f32))
            },
        );
        for i in 0..rows {
            for j in 0..width {
                assert_eq!(v[i * width + j], (i * 10 + j) as f32);
            }
        }
        let want: Vec<usize> = (0..rows)
            .collect::<Vec<_>>()
            .chunks(8)
            .map(|c| c.iter().sum())
            .collect();
        assert_eq!(sums, want);
    }

    #[test]
    fn rows_are_built_in_place() {
        let (rows, width) = (37, 5);
        let v = new_rows(rows, width, |i, row| {
            row.fill((0..width).map(|j| (i * 10 + j) as f32))
        });
        for i in 0..rows {
            for j in 0..width {
                assert_eq!(v[i * width + j], (i * 10 + j) as f32);
            }
        }
        let mut other: Vec<f32> = (0..rows * width).map(|e| e as f32).collect();
        let w = new_rows_with(&mut other, width, |_, o, row| {
            row.fill(o.iter().map(|x| x * 2.0));
            o.iter_mut().for_each(|x| *x = -*x);
        });
        for e in 0..rows * width {
            assert_eq!((w[e], other[e]), (2.0 * e as f32, -(e as f32)));
        }
        assert!(new_rows(0, 3, |_, _| unreachable!()).is_empty());
        assert!(new_rows(4, 0, |_, _| unreachable!()).is_empty());
    }

    #[test]
    #[should_panic(expected = "got 2 values")]
    fn a_short_row_is_refused() {
        new_rows(3, 4, |_, row| row.fill([1.0, 2.0].into_iter()));
    }

    #[test]
    #[should_panic(expected = "was not filled")]
    fn a_skipped_row_is_refused() {
        new_rows(3, 4, |i, row| {
            if i != 1 {
                row.fill([0.0; 4].into_iter())
            }
        });
    }
}
