//! [`Bands`]: one row-major output that parallel tasks fill in disjoint blocks.
//!
//! Attention computes one head at a time, but its results are token rows holding every head
//! side by side (`(B·T, H·Dh)`): head `h` of sequence `b` owns the `Dh` columns `h·Dh..` of the
//! sequence's `T` rows. Writing each head's product straight into its columns, with the row
//! stride of the whole matrix, saves a per-head buffer and a pass that lays the heads out
//! afterwards. Rust's borrows cannot split a matrix by columns, so the tasks share a raw view;
//! each call names the block it writes and vouches that no other task touches it.

use std::marker::PhantomData;
use std::mem::MaybeUninit;

/// A shared view of `len` floats that parallel tasks write through [`Bands::gemm`], each into
/// its own elements. Borrows the buffer for its lifetime.
pub struct Bands<'a> {
    ptr: *mut f32,
    len: usize,
    init: bool,
    _buf: PhantomData<&'a mut [f32]>,
}

// SAFETY: a `Bands` only hands out writes through `gemm`, whose contract makes every concurrent
// caller's block disjoint from every other's; the buffer outlives the view (borrowed for 'a).
unsafe impl Send for Bands<'_> {}
// SAFETY: as above.
unsafe impl Sync for Bands<'_> {}

impl<'a> Bands<'a> {
    /// A view of initialized floats, which products may accumulate into.
    pub fn new(buf: &'a mut [f32]) -> Self {
        Bands {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
            init: true,
            _buf: PhantomData,
        }
    }

    /// A view of memory not yet initialized (see [`super::filled`]), which products may only
    /// overwrite.
    pub fn uninit(buf: &'a mut [MaybeUninit<f32>]) -> Self {
        Bands {
            ptr: buf.as_mut_ptr().cast(),
            len: buf.len(),
            init: false,
            _buf: PhantomData,
        }
    }

    /// `dst (m×n at offset, row stride dst_rs) = [dst +] lhs (m×k) · rhs (k×n)`, as
    /// [`super::gemm`] on one thread.
    ///
    /// # Safety
    /// No other call running at the same time may touch an element of this call's block
    /// (`offset + i·dst_rs + j`, `i < m`, `j < n`).
    ///
    /// # Panics
    /// If the block lies outside the buffer, if an operand is too short for its shape, or if
    /// `accumulate` is asked of a view of uninitialized memory.
    pub unsafe fn gemm(
        &self,
        offset: usize,
        (m, n, k): (usize, usize, usize),
        dst_rs: usize,
        accumulate: bool,
        (lhs, lhs_rs, lhs_cs): (&[f32], usize, usize),
        (rhs, rhs_rs, rhs_cs): (&[f32], usize, usize),
    ) {
        assert!(
            self.init || !accumulate,
            "accumulating into uninitialized memory"
        );
        assert!(offset <= self.len, "block outside the buffer");
        // SAFETY: `offset` is inside the buffer, and gemm_raw checks the block against the
        // `len − offset` floats after it; the block is this caller's alone (the contract), and
        // holds initialized floats whenever it is read (`accumulate` only on `init` views).
        unsafe {
            super::gemm_raw(
                m,
                n,
                k,
                self.ptr.add(offset),
                self.len - offset,
                dst_rs,
                accumulate,
                lhs,
                lhs_rs,
                lhs_cs,
                rhs,
                rhs_rs,
                rhs_cs,
                1.0,
                1,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
                unsafe {
                    view.gemm(
                        h * band,
                        (rows, band, 2),
                        width,
                        true,
                        (&lhs, 2, 1),
                        (&rhs, band, 1),
                    )
                };
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
    #[should_panic(expected = "uninitialized")]
    fn an_uninitialized_view_refuses_to_accumulate() {
        let mut buf = vec![MaybeUninit::<f32>::uninit(); 4];
        let view = Bands::uninit(&mut buf);
        // SAFETY: one caller.
        unsafe { view.gemm(0, (1, 1, 1), 1, true, (&[1.0], 1, 1), (&[1.0], 1, 1)) };
    }
}
