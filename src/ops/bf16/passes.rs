//! What the packed routes of the bf16 products (`amx`, and `avx512bf16`/`avx512f`) share
//! around their kernels: a long reduction taken in passes, so the packed left operand stays
//! bounded, and the packing buffers each thread keeps from one product to the next.

use std::cell::Cell;
use std::ops::Range;
use std::thread::LocalKey;

use super::PairRows;
use crate::ops::mat::{Accum, MatMut, Par};

/// Most `u32` pairs of packed left operand one pass holds (8 MiB): a longer reduction is
/// taken in slices of whole reduction blocks, so the head's `dlogits · E` (k = the vocabulary)
/// never packs, or keeps per thread, a copy of its whole left operand.
pub(super) const A_PACK_MAX: usize = 2 << 20;

/// `dst [+]= scale · lhs · rhs` in passes of `pass` (one pass of a route over the whole
/// reduction of the operands it is given, its left one packed whole), each over a slice of the
/// reduction that is a whole number of `step` rows and packs at most [`A_PACK_MAX`] pairs of
/// the left operand (its rows rounded up to `row_unit`, the route's panel height).
#[allow(clippy::too_many_arguments)]
pub(super) fn in_passes(
    mut dst: MatMut<'_>,
    acc: Accum,
    lhs_t: &dyn PairRows,
    rhs: &dyn PairRows,
    scale: f32,
    par: Par,
    (row_unit, step): (usize, usize),
    pass: impl Fn(MatMut<'_>, Accum, &dyn PairRows, &dyn PairRows, f32, Par),
) {
    let (m, k) = (dst.rows(), lhs_t.rows());
    let slice = (A_PACK_MAX / (m.div_ceil(row_unit) * row_unit) * 2 / step).max(1) * step;
    if k <= slice {
        return pass(dst, acc, lhs_t, rhs, scale, par);
    }
    for k0 in (0..k).step_by(slice) {
        let rows = slice.min(k - k0);
        let acc = if k0 == 0 { acc } else { Accum::Add };
        let (l, r) = (Rows::of(lhs_t, k0, rows), Rows::of(rhs, k0, rows));
        pass(dst.rb(), acc, &l, &r, scale, par);
        if k0 == 0 && acc == Accum::Write {
            // SAFETY: the first pass overwrote every element of the output.
            unsafe { dst.assume_init() };
        }
    }
}

/// Rows `k0..k0 + rows` of a [`PairRows`] operand: a slice of the reduction. `rows` is a whole
/// number of pairs, or the slice ends where the operand does, so its pairs are the operand's.
pub(super) struct Rows<'a> {
    inner: &'a dyn PairRows,
    k0: usize,
    rows: usize,
}

impl<'a> Rows<'a> {
    pub(super) fn of(inner: &'a dyn PairRows, k0: usize, rows: usize) -> Self {
        debug_assert!(
            k0.is_multiple_of(2) && (rows.is_multiple_of(2) || k0 + rows == inner.rows())
        );
        Rows { inner, k0, rows }
    }

    /// Pairs asked for from `k0` that lie in the slice (the rest are zero past its end).
    fn pairs_in(&self, k0: usize, kp: usize) -> usize {
        kp.min((self.rows.saturating_sub(k0)).div_ceil(2))
    }
}

impl PairRows for Rows<'_> {
    fn rows(&self) -> usize {
        self.rows
    }
    fn cols(&self) -> usize {
        self.inner.cols()
    }
    fn bits(&self, i: usize, j: usize) -> u16 {
        self.inner.bits(self.k0 + i, j)
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
        let inside = self.pairs_in(k0, kp);
        self.inner
            .pack_pairs(self.k0 + k0, inside, j0, nj, width, out);
        out[inside * width..kp * width].fill(0);
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
        // A slice that ends where the operand does is zero past its end as the operand is.
        if self.pairs_in(k0, kp) == kp || self.k0 + self.rows == self.inner.rows() {
            self.inner
                .pack_pairs_by_column(self.k0 + k0, kp, j0, nj, width, out);
        } else {
            super::pack_by_column_elementwise(self, k0, kp, j0, nj, width, out);
        }
    }
}

thread_local! {
    /// The packed left operand of this thread's last product, kept for the next one: a
    /// training step runs thousands of products, and fresh megabyte buffers each cost their
    /// pages' first-touch faults.
    pub(super) static A_BUFFER: Cell<Vec<u32>> = const { Cell::new(Vec::new()) };
    /// The same for a task's packed right panels.
    pub(super) static B_BUFFER: Cell<Vec<u32>> = const { Cell::new(Vec::new()) };
}

/// This thread's kept buffer, at least `len` long (contents unspecified: packing overwrites
/// the `len` it uses). Taken out of the slot while in use, so a nested product on the same
/// thread gets its own. It only grows: cutting it to each product's length had it zeroed
/// afresh whenever a large product followed the attention core's small ones (about 70 MB a
/// step on llama-small-1024: little, but work for nothing).
pub(super) fn take_buffer(slot: &'static LocalKey<Cell<Vec<u32>>>, len: usize) -> Vec<u32> {
    let mut v = slot.take();
    if v.len() < len {
        v.resize(len, 0);
    }
    v
}

/// Puts a buffer back for this thread's next product (the larger one, if a nested product
/// returned one meanwhile).
pub(super) fn return_buffer(slot: &'static LocalKey<Cell<Vec<u32>>>, v: Vec<u32>) {
    let held = slot.take();
    slot.set(if held.capacity() > v.capacity() {
        held
    } else {
        v
    });
}

/// How a product's output is cut into tasks: by column panels first (each task packs its own
/// right panels, at most `most_panels` of them), and by row panels as well when there are too
/// few column panels to go round. With several threads there are at least two tasks per
/// thread and the column tasks come in a multiple of the threads, panels shared out evenly (a
/// task holds one panel more than another at most): 88 panels (2816 columns) in 11 tasks of 8
/// had left one of two threads a task behind the other.
pub(super) struct Split {
    npan: usize,
    mpan: usize,
    tasks_n: usize,
    tasks_m: usize,
}

impl Split {
    /// The tasks for `npan` column panels and `mpan` row panels on `threads` threads.
    pub(super) fn new(npan: usize, mpan: usize, threads: usize, most_panels: usize) -> Self {
        let want = if threads > 1 { 2 * threads } else { 1 };
        let mut tasks_n = npan.div_ceil(most_panels.max(1)).max(want.min(npan));
        if threads > 1 {
            tasks_n = tasks_n.next_multiple_of(threads).min(npan);
        }
        let tasks_n = tasks_n.max(1);
        let tasks_m = if tasks_n >= want {
            1
        } else {
            want.div_ceil(tasks_n).min(mpan).max(1)
        };
        Split {
            npan,
            mpan,
            tasks_n,
            tasks_m,
        }
    }

    /// How many tasks.
    pub(super) fn tasks(&self) -> usize {
        self.tasks_n * self.tasks_m
    }

    /// Task `t`'s column panels and row panels.
    pub(super) fn panels(&self, t: usize) -> (Range<usize>, Range<usize>) {
        let share = |len: usize, parts: usize, i: usize| i * len / parts..(i + 1) * len / parts;
        (
            share(self.npan, self.tasks_n, t % self.tasks_n),
            share(self.mpan, self.tasks_m, t / self.tasks_n),
        )
    }
}
