//! Element-wise passes over whole buffers, in parallel over fixed chunks so that results do not
//! depend on the thread count.

use rayon::prelude::*;

/// Elements per parallel work item of the element-wise passes.
pub const PAR_CHUNK: usize = 1 << 14;

/// `dst += src`, element-wise, in parallel (residual connections, gradient sums).
///
/// # Panics
/// If the lengths differ.
pub fn add_assign(dst: &mut [f32], src: &[f32]) {
    assert_eq!(dst.len(), src.len(), "add_assign: lengths differ");
    dst.par_chunks_mut(PAR_CHUNK)
        .zip(src.par_chunks(PAR_CHUNK))
        .for_each(|(d, s)| d.iter_mut().zip(s).for_each(|(a, b)| *a += b));
}

/// Adds the per-block partial sums `parts` (block order) over their first `len` elements, in
/// parallel over fixed ranges of the result; the order of the additions, and so the result,
/// does not depend on the thread count. (Column sums split over row blocks: adapter and
/// norm weight gradients.)
pub fn reduce_parts(parts: &[Vec<f32>], len: usize) -> Vec<f32> {
    const CHUNK: usize = 1 << 12;
    let mut out = vec![0f32; len];
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, o)| {
        for p in parts {
            let src = &p[c * CHUNK..c * CHUNK + o.len()];
            o.iter_mut().zip(src).for_each(|(a, b)| *a += b);
        }
    });
    out
}
