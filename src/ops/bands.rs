//! [`Bands`]: one row-major output that parallel tasks fill in disjoint blocks.
//!
//! Attention computes one head at a time, but its results are token rows holding every head
//! side by side (`(B·T, H·Dh)`): head `h` of sequence `b` owns the `Dh` columns `h·Dh..` of the
//! sequence's `T` rows. Writing each head's product straight into its columns, with the row
//! stride of the whole matrix, saves a per-head buffer and a pass that lays the heads out
//! afterwards. Rust's borrows cannot split a matrix by columns, so the tasks share a raw view;
//! each call names the block it takes and vouches that no other task touches it.

use std::marker::PhantomData;
use std::mem::MaybeUninit;

use super::mat::MatMut;

/// A shared view of `len` floats from which parallel tasks take disjoint output blocks
/// ([`Bands::block`]). Borrows the buffer for its lifetime.
pub struct Bands<'a> {
    ptr: *mut f32,
    len: usize,
    init: bool,
    _buf: PhantomData<&'a mut [f32]>,
}

// SAFETY: a `Bands` only hands out blocks through `block`, whose contract makes every
// concurrent caller's block disjoint from every other's; the buffer outlives the view.
unsafe impl Send for Bands<'_> {}
// SAFETY: as above.
unsafe impl Sync for Bands<'_> {}

impl<'a> Bands<'a> {
    /// A view of initialized floats, whose blocks products may add to.
    pub fn new(buf: &'a mut [f32]) -> Self {
        Bands {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
            init: true,
            _buf: PhantomData,
        }
    }

    /// A view of memory not yet initialized, whose blocks products may only overwrite.
    pub fn uninit(buf: &'a mut [MaybeUninit<f32>]) -> Self {
        Bands {
            ptr: buf.as_mut_ptr().cast(),
            len: buf.len(),
            init: false,
            _buf: PhantomData,
        }
    }

    /// The `rows × cols` block at `offset` with rows `row_stride` apart, as an output view.
    ///
    /// # Safety
    /// While the returned view lives, no other view or reference may touch an element of its
    /// block (`offset + i·row_stride + j`, `i < rows`, `j < cols`).
    ///
    /// # Panics
    /// If the block lies outside the buffer.
    pub unsafe fn block(
        &self,
        offset: usize,
        rows: usize,
        cols: usize,
        row_stride: usize,
    ) -> MatMut<'_> {
        assert!(
            rows == 0 || cols == 0 || offset + (rows - 1) * row_stride + cols <= self.len,
            "block outside the buffer"
        );
        // SAFETY: the block lies inside the buffer (asserted), which is borrowed for 'a; it is
        // this caller's alone (the contract), and holds initialized floats whenever the view
        // says so (`init`).
        unsafe { MatMut::from_raw(self.ptr.add(offset), (rows, cols, row_stride), self.init) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::{gemm, Accum, MatRef, Par};
    use rayon::prelude::*;

    /// Four tasks write the four column bands of a 3×8 matrix in parallel (two of them twice,
    /// accumulating): the result is each band's product in place, untouched elsewhere.
    #[test]
    fn parallel_bands_land_in_their_columns() {
        let (rows, width, band) = (3, 8, 2);
        let lhs: Vec<f32> = (0..rows * 2).map(|i| i as f32 + 1.0).collect();
        let rhs: Vec<f32> = (0..2 * band).map(|i| (i as f32) * 0.5 - 1.0).collect();
        let mut out = vec![0f32; rows * width];
        let view = Bands::new(&mut out);
        (0..width / band).into_par_iter().for_each(|h| {
            let times = if h % 2 == 0 { 1 } else { 2 };
            for _ in 0..times {
                // SAFETY: task `h` alone writes columns `h·band..`.
                let dst = unsafe { view.block(h * band, rows, band, width) };
                let (l, r) = (MatRef::new(&lhs, rows, 2), MatRef::new(&rhs, 2, band));
                gemm(dst, Accum::Add, l, r, 1.0, Par::Serial);
            }
        });
        for i in 0..rows {
            for j in 0..width {
                let c = j % band;
                let p = lhs[i * 2] * rhs[c] + lhs[i * 2 + 1] * rhs[band + c];
                let times = if (j / band) % 2 == 0 { 1.0 } else { 2.0 };
                assert_eq!(out[i * width + j], p * times, "({i}, {j})");
            }
        }
    }

    #[test]
    #[should_panic(expected = "unwritten")]
    fn an_uninitialized_view_refuses_to_accumulate() {
        let mut buf = vec![MaybeUninit::<f32>::uninit(); 4];
        let view = Bands::uninit(&mut buf);
        let one = [1.0f32];
        // SAFETY: one caller.
        let dst = unsafe { view.block(0, 1, 1, 1) };
        gemm(
            dst,
            Accum::Add,
            MatRef::new(&one, 1, 1),
            MatRef::new(&one, 1, 1),
            1.0,
            Par::Serial,
        );
    }

    #[test]
    #[should_panic(expected = "outside")]
    fn a_block_past_the_buffer_is_refused() {
        let mut buf = vec![0f32; 8];
        let view = Bands::new(&mut buf);
        // SAFETY: one caller.
        let _ = unsafe { view.block(6, 2, 2, 4) };
    }
}
