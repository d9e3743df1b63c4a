//! Transposed weight tiles for the forward product `y = x·Wᵀ`.
//!
//! gemm's microkernel reads its left operand in columns. In `y = x·Wᵀ` that operand is W, whose
//! rows are contiguous along the reduction axis, so gemm re-packs W for every block of tokens:
//! with AVX-512 kernels a 1024×1024 weight times 1024 tokens ran at 250–290 GFLOP/s that way and
//! at 330–357 GFLOP/s when the tile arrived already transposed (`Wᵀ`, rows = input features).
//! Writing the tile transposed costs a streaming pass: for a 4-bit weight, whose tile has to be
//! written anyway, it is free (nf4 forward 203–215 → 253–260 GFLOP/s); for dense weights it pays
//! only while the tiles stay in cache (see `ops::matmul_nt`).
//!
//! The fast path needs AVX2 and FMA at compile time (the crate builds with
//! `target-cpu=native`) and a row length that is a multiple of 8; [`available`] says whether a
//! product can take it, and callers keep the plain route otherwise.

use rayon::prelude::*;

use super::lanes::F8;
use super::mat::{gemm, Accum, MatMut, MatRef, Par};

/// Columns of W (rows of the transposed tile) one parallel task writes: 128 columns are one
/// cache line of 4-bit codes per row.
const TASK_COLS: usize = 128;

/// Rows of W per parallel tile of a dense forward product.
pub const TILE_ROWS: usize = 512;

/// Whether rows of `cols` elements can be transposed by the vector kernel on this build.
pub fn available(cols: usize) -> bool {
    cfg!(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    )) && cols.is_multiple_of(8)
        && cols > 0
}

/// Writes rows `r0..r1` of a row-major `(rows × cols)` matrix `w`, transposed, into `t`
/// (`cols × (r1 − r0)`, row-major).
///
/// # Panics
/// If [`available`] is false for `cols`, or a slice is too short.
pub fn transpose_rows(w: &[f32], cols: usize, r0: usize, r1: usize, t: &mut [f32]) {
    assert!(w.len() >= r1 * cols, "transpose_rows: w too short");
    transpose_with(
        r0,
        r1,
        cols,
        t,
        |row, col| F8::load(&w[row * cols + col..]),
        |row, col| w[row * cols + col],
    );
}

/// The transposing traversal shared by dense and 4-bit tiles: `load8(row, col)` yields the 8
/// elements `row, col..col + 8` of the source (`col` a multiple of 8), `load1` one element.
/// Rows go in groups of 16, so each store fills one 64-byte line of the transposed tile.
///
/// # Panics
/// If [`available`] is false for `cols`, or `t` is shorter than `cols × (r1 − r0)`.
pub(crate) fn transpose_with<L, S>(
    r0: usize,
    r1: usize,
    cols: usize,
    t: &mut [f32],
    load8: L,
    load1: S,
) where
    L: Fn(usize, usize) -> F8 + Sync,
    S: Fn(usize, usize) -> f32 + Sync,
{
    assert!(
        available(cols),
        "transpose: {cols} columns cannot take the vector path"
    );
    let rr = r1 - r0;
    if rr == 0 {
        return;
    }
    let t = &mut t[..cols * rr];
    let full = rr / 16 * 16;
    t.par_chunks_mut(TASK_COLS * rr)
        .enumerate()
        .for_each(|(task, chunk)| {
            let c0 = task * TASK_COLS;
            let ncols = chunk.len() / rr;
            for g in (0..full).step_by(16) {
                for c in (0..ncols).step_by(8) {
                    let lo = F8::transpose(std::array::from_fn(|i| load8(r0 + g + i, c0 + c)));
                    let hi = F8::transpose(std::array::from_fn(|i| load8(r0 + g + 8 + i, c0 + c)));
                    for j in 0..8 {
                        let dst = &mut chunk[(c + j) * rr + g..(c + j) * rr + g + 16];
                        lo[j].store(&mut dst[..8]);
                        hi[j].store(&mut dst[8..]);
                    }
                }
            }
            for g in full..rr {
                for c in 0..ncols {
                    chunk[c * rr + g] = load1(r0 + g, c0 + c);
                }
            }
        });
}

/// `y (n × out) = x (n × in) · Wᵀ` for a dense row-major `W (out × in)`, one transposed tile of
/// [`TILE_ROWS`] rows at a time (see the module doc): every column band of `y` is overwritten.
/// Requires [`available`]`(inp)`.
///
/// # Panics
/// If the shapes disagree.
pub fn matmul_nt_tiled(x: MatRef<'_>, w: &[f32], mut y: MatMut<'_>) {
    let (n, inp, out) = (x.rows(), x.cols(), y.cols());
    assert!(
        y.rows() == n && w.len() == out * inp,
        "matmul_nt_tiled shapes"
    );
    let mut tile = vec![0f32; TILE_ROWS.min(out) * inp];
    for r0 in (0..out).step_by(TILE_ROWS) {
        let r1 = (r0 + TILE_ROWS).min(out);
        let t = &mut tile[..(r1 - r0) * inp];
        transpose_rows(w, inp, r0, r1, t);
        let tile = MatRef::new(t, inp, r1 - r0);
        gemm(y.columns(r0, r1), Accum::Write, x, tile, 1.0, Par::All);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transposed_tiles_match_naive() {
        if !available(8) {
            eprintln!("skipped: the transposed tiles need AVX2 + FMA, which this build lacks");
            return;
        }
        // rows cover a 16-row group plus a remainder; columns span two tasks
        let (rows, cols) = (37, 136);
        let w: Vec<f32> = (0..rows * cols).map(|i| i as f32 * 0.5 - 3.0).collect();
        for (r0, r1) in [(0, rows), (5, 30), (16, 32), (36, 37)] {
            let mut t = vec![f32::NAN; cols * (r1 - r0)];
            transpose_rows(&w, cols, r0, r1, &mut t);
            for r in r0..r1 {
                for c in 0..cols {
                    assert_eq!(t[c * (r1 - r0) + r - r0], w[r * cols + c], "({r}, {c})");
                }
            }
        }
    }

    #[test]
    fn tiled_product_equals_plain() {
        if !available(8) {
            eprintln!("skipped: the transposed tiles need AVX2 + FMA, which this build lacks");
            return;
        }
        let (n, out, inp) = (70, 600, 48);
        let x: Vec<f32> = (0..n * inp)
            .map(|i| ((i * 7 % 13) as f32 - 6.0) / 8.0)
            .collect();
        let w: Vec<f32> = (0..out * inp)
            .map(|i| ((i * 5 % 11) as f32 - 5.0) / 4.0)
            .collect();
        // SAFETY: the tiles cover every column of every row.
        let y = unsafe {
            crate::ops::uninit::new_matrix(n, out, |y| {
                matmul_nt_tiled(MatRef::new(&x, n, inp), &w, y)
            })
        };
        for i in 0..n {
            for o in 0..out {
                let want: f32 = (0..inp).map(|k| x[i * inp + k] * w[o * inp + k]).sum();
                assert!((y[i * out + o] - want).abs() < 1e-4, "({i}, {o})");
            }
        }
    }
}
