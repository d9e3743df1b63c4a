//! Matrix views and the one door to the `gemm` crate.
//!
//! [`MatRef`] is a read-only strided view (element `(i, j)` at `i·row_stride + j·col_stride`),
//! so a transposed operand is a view, never a copy ([`MatRef::t`]). [`MatMut`] is a row-major
//! output view over initialized floats or over memory not yet written; [`gemm`] either
//! overwrites it ([`Accum::Write`], the only choice for unwritten memory) or adds to it
//! ([`Accum::Add`]). Views check at construction that their slice covers every element they
//! name, so a product can never reach outside its buffers. (faer's `MatRef`/`MatMut` with an
//! accumulate flag is the model.)

use std::marker::PhantomData;
use std::mem::MaybeUninit;

use gemm::Parallelism;

/// Whether a product overwrites its destination or adds to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accum {
    /// `dst = scale · lhs · rhs` (the destination is only written).
    Write,
    /// `dst += scale · lhs · rhs`.
    Add,
}

/// How many threads one product may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Par {
    /// The calling thread only (products inside parallel tasks).
    Serial,
    /// All of rayon's pool ([`threads`]).
    All,
}

/// Threads to give one large matrix product (all of rayon's pool).
pub fn threads() -> usize {
    rayon::current_num_threads()
}

/// Whether `len` elements cover a `rows × cols` block with strides `rs`, `cs`.
pub(super) fn covers(len: usize, rows: usize, cols: usize, rs: usize, cs: usize) -> bool {
    rows == 0 || cols == 0 || (rows - 1) * rs + (cols - 1) * cs < len
}

/// A read-only `rows × cols` matrix over a slice, with arbitrary element strides.
#[derive(Debug, Clone, Copy)]
pub struct MatRef<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> MatRef<'a> {
    /// A row-major `rows × cols` matrix whose rows start `row_stride` elements apart.
    ///
    /// # Panics
    /// If `data` is too short for the shape.
    #[track_caller]
    pub fn strided(data: &'a [f32], rows: usize, cols: usize, row_stride: usize) -> Self {
        assert!(
            covers(data.len(), rows, cols, row_stride, 1),
            "MatRef: {} elements for {rows}×{cols} with row stride {row_stride}",
            data.len()
        );
        MatRef {
            data,
            rows,
            cols,
            rs: row_stride,
            cs: 1,
        }
    }

    /// A contiguous row-major `rows × cols` matrix.
    ///
    /// # Panics
    /// If `data` is too short for the shape.
    #[track_caller]
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self::strided(data, rows, cols, cols)
    }

    /// Columns `c0..c1` of this view.
    ///
    /// # Panics
    /// If the range is outside the view.
    #[track_caller]
    pub fn columns(self, c0: usize, c1: usize) -> Self {
        assert!(
            c0 <= c1 && c1 <= self.cols,
            "columns {c0}..{c1} of {}",
            self.cols
        );
        let start = (c0 * self.cs).min(self.data.len());
        MatRef {
            data: &self.data[start..],
            cols: c1 - c0,
            ..self
        }
    }

    /// The transposed view (`cols × rows`), no copy.
    pub fn t(self) -> Self {
        MatRef {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Element `(i, j)`.
    ///
    /// # Panics
    /// If `(i, j)` is outside the view's slice.
    #[inline(always)]
    pub fn at(&self, i: usize, j: usize) -> f32 {
        self.data[i * self.rs + j * self.cs]
    }

    /// Rows `i0..i0 + len` of column `j` as one slice, where rows are adjacent in memory (row
    /// stride 1, as in a transposed row-major matrix); `None` otherwise.
    ///
    /// # Panics
    /// If the range is outside the view.
    pub fn column_run(&self, j: usize, i0: usize, len: usize) -> Option<&'a [f32]> {
        assert!(
            i0 + len <= self.rows && j < self.cols,
            "column_run outside the view"
        );
        (self.rs == 1).then(|| &self.data[j * self.cs + i0..][..len])
    }

    /// Columns `j0..j0 + len` of row `i` as one slice, where columns are adjacent in memory
    /// (column stride 1, as in a row-major matrix); `None` otherwise.
    ///
    /// # Panics
    /// If the range is outside the view.
    pub fn row_run(&self, i: usize, j0: usize, len: usize) -> Option<&'a [f32]> {
        assert!(
            j0 + len <= self.cols && i < self.rows,
            "row_run outside the view"
        );
        (self.cs == 1).then(|| &self.data[i * self.rs + j0..][..len])
    }
}

/// A row-major `rows × cols` output block (rows `row_stride` apart) over initialized floats or
/// over memory not yet written. Borrows its buffer mutably for `'a`.
pub struct MatMut<'a> {
    ptr: *mut f32,
    rows: usize,
    cols: usize,
    rs: usize,
    init: bool,
    _buf: PhantomData<&'a mut [f32]>,
}

// SAFETY: a MatMut is a unique borrow of its block (constructed from `&mut` slices, or from a
// shared view whose caller vouches for disjointness), so moving it to another thread is as safe
// as moving the `&mut` slice.
unsafe impl Send for MatMut<'_> {}

impl<'a> MatMut<'a> {
    /// A block over initialized floats, rows `row_stride` apart: products may add to it.
    ///
    /// # Panics
    /// If `data` is too short for the shape.
    #[track_caller]
    pub fn strided(data: &'a mut [f32], rows: usize, cols: usize, row_stride: usize) -> Self {
        assert!(
            covers(data.len(), rows, cols, row_stride, 1),
            "MatMut: {} elements for {rows}×{cols} with row stride {row_stride}",
            data.len()
        );
        MatMut {
            ptr: data.as_mut_ptr(),
            rows,
            cols,
            rs: row_stride,
            init: true,
            _buf: PhantomData,
        }
    }

    /// A contiguous block over initialized floats.
    ///
    /// # Panics
    /// If `data` is too short for the shape.
    #[track_caller]
    pub fn new(data: &'a mut [f32], rows: usize, cols: usize) -> Self {
        Self::strided(data, rows, cols, cols)
    }

    /// A block over memory not yet written (see [`super::uninit`]): products may only
    /// overwrite it ([`Accum::Write`]), which writes every element of the block.
    ///
    /// # Panics
    /// If `data` is too short for the shape.
    #[track_caller]
    pub fn uninit(
        data: &'a mut [MaybeUninit<f32>],
        rows: usize,
        cols: usize,
        row_stride: usize,
    ) -> Self {
        assert!(
            covers(data.len(), rows, cols, row_stride, 1),
            "MatMut: {} elements for {rows}×{cols} with row stride {row_stride}",
            data.len()
        );
        MatMut {
            ptr: data.as_mut_ptr().cast(),
            rows,
            cols,
            rs: row_stride,
            init: false,
            _buf: PhantomData,
        }
    }

    /// A block at `ptr` (see [`super::bands::Bands`]).
    ///
    /// # Safety
    /// `ptr` must be valid for writes (and, with `init`, reads of initialized floats) over
    /// every element of the block, and no other live reference may touch them for `'a`.
    pub(crate) unsafe fn from_raw(
        ptr: *mut f32,
        (rows, cols, row_stride): (usize, usize, usize),
        init: bool,
    ) -> Self {
        MatMut {
            ptr,
            rows,
            cols,
            rs: row_stride,
            init,
            _buf: PhantomData,
        }
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Whether the block holds written floats (products may add to it).
    pub fn is_init(&self) -> bool {
        self.init
    }

    /// The first element and the row stride, for kernels that write the block themselves.
    pub(crate) fn raw(&mut self) -> (*mut f32, usize) {
        (self.ptr, self.rs)
    }

    /// Overwrites the whole block with zeros (and marks it written).
    pub fn fill_zero(&mut self) {
        for i in 0..self.rows {
            for j in 0..self.cols {
                // SAFETY: (i, j) lies in the block the view covers (checked when it was made).
                unsafe { self.ptr.add(i * self.rs + j).write(0.0) };
            }
        }
        self.init = true;
    }

    /// This block, reborrowed (for several products into one view).
    pub fn rb(&mut self) -> MatMut<'_> {
        self.columns(0, self.cols)
    }

    /// Marks a view of unwritten memory as written, so later products may add to it.
    ///
    /// # Safety
    /// Every element of the block must have been written (e.g. by a [`gemm`] with
    /// [`Accum::Write`] into this view).
    pub(crate) unsafe fn assume_init(&mut self) {
        self.init = true;
    }

    /// Columns `c0..c1` of this block, reborrowed.
    ///
    /// # Panics
    /// If the range is outside the block.
    #[track_caller]
    pub fn columns(&mut self, c0: usize, c1: usize) -> MatMut<'_> {
        assert!(
            c0 <= c1 && c1 <= self.cols,
            "columns {c0}..{c1} of {}",
            self.cols
        );
        MatMut {
            // SAFETY: `c0 ≤ cols`, so the offset stays inside (or one past) the block's first
            // row, which the view covers.
            ptr: unsafe { self.ptr.add(c0) },
            cols: c1 - c0,
            _buf: PhantomData,
            ..*self
        }
    }
}

/// `dst (m×n) = [dst +] scale · lhs (m×k) · rhs (k×n)` through gemm, on one thread or all of
/// rayon's pool (`par`; small products always run on one).
///
/// # Panics
/// If the shapes do not chain, or `acc` is [`Accum::Add`] on a view of unwritten memory.
#[track_caller]
pub fn gemm(dst: MatMut<'_>, acc: Accum, lhs: MatRef<'_>, rhs: MatRef<'_>, scale: f32, par: Par) {
    let (m, n, k) = (dst.rows, dst.cols, lhs.cols);
    assert!(
        lhs.rows == m && rhs.rows == k && rhs.cols == n,
        "gemm: {}×{} · {}×{} into {m}×{n}",
        lhs.rows,
        lhs.cols,
        rhs.rows,
        rhs.cols
    );
    let add = acc == Accum::Add;
    assert!(dst.init || !add, "gemm: adding into unwritten memory");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !add {
            for i in 0..m {
                for j in 0..n {
                    // SAFETY: (i, j) lies in the block the view covers (checked when it was
                    // made).
                    unsafe { dst.ptr.add(i * dst.rs + j).write(0.0) };
                }
            }
        }
        return;
    }
    let threads = match par {
        Par::Serial => 1,
        Par::All => threads(),
    };
    let par = if threads <= 1 || m * n * k < 48 * 48 * 48 {
        Parallelism::None
    } else {
        Parallelism::Rayon(threads)
    };
    // SAFETY: the views cover every element they name (checked at construction), `dst` is a
    // unique borrow of its block, and gemm reads `dst` only when adding, which is refused for
    // unwritten memory above.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.ptr,
            1,
            dst.rs as isize,
            add,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            1.0,
            scale,
            false,
            false,
            false,
            par,
        );
    }
}

/// Largest dense weight (elements) whose forward product takes transposed tiles: up to 8 MiB
/// the tiles stay in cache and beat gemm's own packing (1024² × 1024 tokens: 280–300 against
/// 260–305 GFLOP/s); a larger weight streams from memory twice that way, and lost (32000×1024
/// head × 256 tokens: 197 against 241; 4096² × 256: 202 against 248).
const TILED_MAX_WEIGHT: usize = 1 << 21;

/// `y (n×out) = x (n×in) · wᵀ` for a row-major `w (out×in)`. Products with a weight of at most
/// [`TILED_MAX_WEIGHT`] elements and many rows take transposed tiles of `w`
/// ([`super::transpose`]); the others go to gemm directly.
pub fn matmul_nt(x: &[f32], n: usize, w: &[f32], out: usize, inp: usize) -> Vec<f32> {
    let tiled =
        n >= 64 && out >= 256 && out * inp <= TILED_MAX_WEIGHT && super::transpose::available(inp);
    let (x, wm) = (MatRef::new(x, n, inp), MatRef::new(w, out, inp));
    // SAFETY: either route overwrites every element of the n × out output.
    unsafe {
        super::uninit::new_matrix(n, out, |y| {
            if tiled {
                super::transpose::matmul_nt_tiled(x, w, y);
            } else {
                gemm(y, Accum::Write, x, wm.t(), 1.0, Par::All);
            }
        })
    }
}

/// `g (p×q) = aᵀ · b` for `a (n×p)`, `b (n×q)` in a new vector: weight gradients.
pub fn matmul_tn(a: &[f32], p: usize, b: &[f32], q: usize, n: usize) -> Vec<f32> {
    let (a, b) = (MatRef::new(a, n, p), MatRef::new(b, n, q));
    // SAFETY: the product overwrites the whole p × q output.
    unsafe { super::uninit::new_matrix(p, q, |g| gemm(g, Accum::Write, a.t(), b, 1.0, Par::All)) }
}

/// `c (m × n) = a (m × k) · b (k × n)`, all row-major, in a new vector.
pub fn matmul_nn(a: &[f32], m: usize, b: &[f32], k: usize, n: usize) -> Vec<f32> {
    let (a, b) = (MatRef::new(a, m, k), MatRef::new(b, k, n));
    // SAFETY: the product overwrites the whole m × n output.
    unsafe { super::uninit::new_matrix(m, n, |c| gemm(c, Accum::Write, a, b, 1.0, Par::All)) }
}

/// Measures the f32 matmul ceiling of this machine: GFLOP/s of a `size³` product, best of
/// `reps` runs (used by benchmarks as the denominator of MFU).
pub fn matmul_ceiling_gflops(size: usize, reps: usize) -> f64 {
    matmul_gflops((size, size, size), reps)
}

/// GFLOP/s of an f32 `(m × k)·(k × n)` product through gemm, best of `reps` runs.
pub fn matmul_gflops((m, n, k): (usize, usize, usize), reps: usize) -> f64 {
    let a = vec![1.0f32; m * k];
    let b = vec![0.5f32; k * n];
    let mut c = vec![0f32; m * n];
    let mut best = f64::MAX;
    for _ in 0..reps.max(1) {
        let t = std::time::Instant::now();
        gemm(
            MatMut::new(&mut c, m, n),
            Accum::Write,
            MatRef::new(&a, m, k),
            MatRef::new(&b, k, n),
            1.0,
            Par::All,
        );
        best = best.min(t.elapsed().as_secs_f64());
    }
    2.0 * (m * n * k) as f64 / best / 1e9
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn products_match_naive() {
        let (n, out, inp) = (5, 7, 3);
        let x: Vec<f32> = (0..n * inp).map(|i| i as f32 * 0.1).collect();
        let w: Vec<f32> = (0..out * inp).map(|i| (i as f32 * 0.7).sin()).collect();
        let y = matmul_nt(&x, n, &w, out, inp);
        for i in 0..n {
            for o in 0..out {
                let want: f32 = (0..inp).map(|k| x[i * inp + k] * w[o * inp + k]).sum();
                assert!((y[i * out + o] - want).abs() < 1e-5);
            }
        }
        let dx = matmul_nn(&y, n, &w, out, inp);
        for i in 0..n {
            for k in 0..inp {
                let want: f32 = (0..out).map(|o| y[i * out + o] * w[o * inp + k]).sum();
                assert!((dx[i * inp + k] - want).abs() < 1e-4);
            }
        }
        let g = matmul_tn(&y, out, &x, inp, n);
        for o in 0..out {
            for k in 0..inp {
                let want: f32 = (0..n).map(|i| y[i * out + o] * x[i * inp + k]).sum();
                assert!((g[o * inp + k] - want).abs() < 1e-4);
            }
        }
        // adding a scaled product onto the result doubles it at scale 1
        let mut twice = g.clone();
        gemm(
            MatMut::new(&mut twice, out, inp),
            Accum::Add,
            MatRef::new(&y, n, out).t(),
            MatRef::new(&x, n, inp),
            0.5,
            Par::Serial,
        );
        for (t, g) in twice.iter().zip(&g) {
            assert!((t - 1.5 * g).abs() < 1e-4);
        }
    }

    #[test]
    fn write_fills_its_block_and_leaves_the_gaps() {
        // k = 0 writes zeros; a strided block leaves the gap columns as they were.
        // SAFETY: a Write product covers its whole view.
        let y = unsafe {
            crate::ops::uninit::new_matrix(2, 3, |y| {
                gemm(
                    y,
                    Accum::Write,
                    MatRef::new(&[], 2, 0),
                    MatRef::new(&[], 0, 3),
                    1.0,
                    Par::Serial,
                )
            })
        };
        assert_eq!(y, vec![0.0; 6]);
        let (a, b) = ([1.0f32, 2.0, 3.0, 4.0], [1.0f32, 0.0, 0.0, 1.0]);
        let mut dst = vec![MaybeUninit::new(9.0f32); 5];
        gemm(
            MatMut::uninit(&mut dst, 2, 2, 3),
            Accum::Write,
            MatRef::new(&a, 2, 2),
            MatRef::new(&b, 2, 2),
            1.0,
            Par::Serial,
        );
        // SAFETY: every element was initialized (9.0) before the product wrote some.
        let got: Vec<f32> = dst.iter().map(|v| unsafe { v.assume_init() }).collect();
        assert_eq!(got, vec![1.0, 2.0, 9.0, 3.0, 4.0]);
    }

    #[test]
    #[should_panic(expected = "unwritten")]
    fn unwritten_memory_cannot_be_added_to() {
        let mut buf = vec![MaybeUninit::<f32>::uninit(); 4];
        let one = [1.0f32];
        gemm(
            MatMut::uninit(&mut buf, 1, 1, 1),
            Accum::Add,
            MatRef::new(&one, 1, 1),
            MatRef::new(&one, 1, 1),
            1.0,
            Par::Serial,
        );
    }

    #[test]
    #[should_panic(expected = "MatRef")]
    fn a_view_past_its_slice_is_refused() {
        let _ = MatRef::strided(&[0.0; 10], 3, 4, 4);
    }
}
