//! The packed route of the bf16 products (`avx512bf16` and `avx512f` kernel sets).
//!
//! Both operands are packed as bf16 pairs along the reduction axis (one `u32` per pair, the
//! lower row in the low half), as `vdpbf16ps` reads them: the left operand whole, once per
//! product, in panels of [`MR`] rows; the right one per task, a block of [`KCP`] pairs × up to
//! 16 panels of [`NR`] columns (`[panel][pair][column]`). A left panel of a reduction of a
//! block or more is laid out `[block][row][pair]`, its rows [`KCP`] pairs apart (the last block
//! padded), so each row packs as one contiguous run, converted without a transpose; the
//! transposing `[pair][row]` layout had cost 12 % of a 1024³ product on Zen 4 (session 19).
//! A shorter reduction keeps `[pair][row]` (no padding). The register
//! tile is `MR × NR` = 12 × 32 f32 sums (24 of the 32 zmm registers): per pair, two loads of
//! the right panel and, per row, one broadcast of the left pair and two dot-product steps. The
//! BLIS loop order: per reduction block, each right panel (64 KiB at a full block) stays in L2
//! while [`MCP`] left panels (24 KiB each, L1's share) pass it. The tile's 24 sums are written
//! out once per block, so the block is long: with 192 pairs (the right panel in L1) those
//! stores and the reloads of partial sums held a single core at 80 % of `vdpbf16ps`'s rate on
//! Zen 4; with 512 it reaches 83–87 % (docs/PERFORMANCE.md, session 18).
//!
//! A reduction too long for the left operand to be packed whole within [`A_PACK_MAX`] pairs
//! (the head's `dlogits · E`) is taken in passes; the packing buffers are kept per thread
//! between products (`passes`).
//!
//! Tasks split the output's columns (and its rows, when there are too few column panels to go
//! round; `passes::Split`), so each writes a disjoint block of it.

use rayon::prelude::*;

use super::passes::{self, return_buffer, take_buffer, Split, A_BUFFER, B_BUFFER};
use super::{Bf16Kernel, PairRows};
use crate::ops::mat::{Accum, MatMut, Par};

/// Rows of the register tile.
pub(super) const MR: usize = 12;
/// Columns of the register tile (two vectors of 16 lanes).
pub(super) const NR: usize = 32;
/// Pairs per reduction block (1024 values).
pub(super) const KCP: usize = 512;
/// Left panels that pass one right panel while it stays in L2.
const MCP: usize = 8;
/// Most column panels one task packs (512 columns).
const TASK_PANELS: usize = 16;
/// Most bytes of packed right panels one task holds (half the L2 of the cores measured), one
/// panel at the least.
const TASK_B_BYTES: usize = 512 << 10;

/// One register tile's work: `kb` pairs of a left panel and a right panel into the output
/// block at `c` (`mr × nr` valid, rows `ldc` apart).
struct Tile<'a> {
    kb: usize,
    a: &'a [u32],
    /// The left panel is `[row][pair]`, rows [`KCP`] pairs apart (else `[pair][row]`).
    by_rows: bool,
    b: &'a [u32],
    c: *mut f32,
    ldc: usize,
    mr: usize,
    nr: usize,
    scale: f32,
    overwrite: bool,
}

/// The output, shared by tasks that write disjoint blocks of it.
struct Out {
    ptr: *mut f32,
    rs: usize,
}

// SAFETY: tasks write disjoint blocks (their own rows × columns) of the output through it.
unsafe impl Sync for Out {}
// SAFETY: as above.
unsafe impl Send for Out {}

impl Out {
    /// The address of element `(i, j)`.
    ///
    /// # Safety
    /// `(i, j)` must lie in the output block.
    unsafe fn at(&self, i: usize, j: usize) -> *mut f32 {
        // SAFETY: the caller's contract.
        unsafe { self.ptr.add(i * self.rs + j) }
    }
}

/// `dst [+]= scale · lhs · rhs` on the packed route (see the module comment).
pub(super) fn gemm(
    kernel: Bf16Kernel,
    dst: MatMut<'_>,
    acc: Accum,
    lhs_t: &dyn PairRows,
    rhs: &dyn PairRows,
    scale: f32,
    par: Par,
) {
    let pass = |dst: MatMut<'_>, acc, lhs_t: &dyn PairRows, rhs: &dyn PairRows, scale, par| {
        gemm_pass(kernel, dst, acc, lhs_t, rhs, scale, par)
    };
    passes::in_passes(dst, acc, lhs_t, rhs, scale, par, (MR, 2 * KCP), pass);
}

/// One pass of [`gemm`] over the whole reduction, the left operand packed whole.
fn gemm_pass(
    kernel: Bf16Kernel,
    mut dst: MatMut<'_>,
    acc: Accum,
    lhs_t: &dyn PairRows,
    rhs: &dyn PairRows,
    scale: f32,
    par: Par,
) {
    let (m, n, k) = (dst.rows(), dst.cols(), lhs_t.rows());
    let kp = k.div_ceil(2);
    let (mpan, npan) = (m.div_ceil(MR), n.div_ceil(NR));
    let threads = match par {
        Par::All if 2 * m * n * k >= 1 << 20 => rayon::current_num_threads(),
        _ => 1,
    };
    // The left operand, panel by panel. With a full reduction block or more, in blocks of
    // KCP pairs (the last one padded with zeros) whose rows lie KCP pairs apart
    // (`[block][row][pair]`): each row's pairs are one contiguous run, packed without a
    // transpose. A shorter reduction is packed pair by pair (`[pair][row]`) and padded nowhere.
    let by_rows = kp >= KCP;
    let panel_len = if by_rows {
        kp.div_ceil(KCP) * KCP * MR
    } else {
        kp * MR
    };
    let mut apack = take_buffer(&A_BUFFER, mpan * panel_len);
    let pack_a = |(ip, panel): (usize, &mut [u32])| {
        let (i0, rows) = (ip * MR, MR.min(m - ip * MR));
        if by_rows {
            for (b, block) in panel.chunks_mut(KCP * MR).enumerate() {
                lhs_t.pack_pairs_by_column(2 * b * KCP, KCP, i0, rows, MR, block);
            }
        } else {
            lhs_t.pack_pairs(0, kp, i0, rows, MR, panel);
        }
    };
    let panels = &mut apack[..mpan * panel_len];
    if threads > 1 {
        panels
            .par_chunks_mut(panel_len)
            .enumerate()
            .for_each(pack_a);
    } else {
        panels.chunks_mut(panel_len).enumerate().for_each(pack_a);
    }
    let most_panels = (TASK_B_BYTES / (4 * NR * KCP.min(kp))).clamp(1, TASK_PANELS);
    let split = Split::new(npan, mpan, threads, most_panels);
    let (ptr, rs) = dst.raw();
    let out = Out { ptr, rs };
    let a_panels = &apack;
    let task = |t: usize| {
        let (cols, rows) = split.panels(t);
        let (jp0, jp1, ip0, ip1) = (cols.start, cols.end, rows.start, rows.end);
        let mut bpack = take_buffer(&B_BUFFER, KCP.min(kp) * NR * (jp1 - jp0));
        for p0 in (0..kp).step_by(KCP) {
            let kb = KCP.min(kp - p0);
            for jp in jp0..jp1 {
                let j0 = jp * NR;
                let panel = &mut bpack[(jp - jp0) * kb * NR..][..kb * NR];
                rhs.pack_pairs(2 * p0, kb, j0, NR.min(n - j0), NR, panel);
            }
            let overwrite = acc == Accum::Write && p0 == 0;
            // a left panel's block: KCP pairs a row laid out by rows, else `kb` pairs
            let a_len = if by_rows { KCP * MR } else { kb * MR };
            for ib in (ip0..ip1).step_by(MCP) {
                for jp in jp0..jp1 {
                    let j0 = jp * NR;
                    let b = &bpack[(jp - jp0) * kb * NR..][..kb * NR];
                    for ip in ib..(ib + MCP).min(ip1) {
                        let i0 = ip * MR;
                        let tile = Tile {
                            kb,
                            a: &a_panels[ip * panel_len + p0 * MR..][..a_len],
                            by_rows,
                            b,
                            // SAFETY: (i0, j0) is this task's, inside the output.
                            c: unsafe { out.at(i0, j0) },
                            ldc: rs,
                            mr: MR.min(m - i0),
                            nr: NR.min(n - j0),
                            scale,
                            overwrite,
                        };
                        // SAFETY: the tile's `mr × nr` block lies in the output and belongs
                        // to this task alone; the kernel set is available (checked by the
                        // caller).
                        unsafe { run_tile(kernel, &tile) };
                    }
                }
            }
        }
        return_buffer(&B_BUFFER, bpack);
    };
    let tasks = split.tasks();
    if tasks == 1 {
        task(0);
    } else {
        (0..tasks).into_par_iter().for_each(task);
    }
    return_buffer(&A_BUFFER, apack);
    if acc == Accum::Write {
        // SAFETY: the first reduction block overwrote every tile of the output.
        unsafe { dst.assume_init() };
    }
}

/// Runs one register tile on `kernel`.
///
/// # Safety
/// The tile's output block must be valid for writes (and reads unless `overwrite`), and the
/// kernel set available on this CPU.
unsafe fn run_tile(kernel: Bf16Kernel, t: &Tile<'_>) {
    assert!(
        t.kb <= KCP
            && t.a.len() >= if t.by_rows { KCP } else { t.kb } * MR
            && t.b.len() >= t.kb * NR
            && t.mr <= MR
            && t.nr <= NR
    );
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the caller's contract; the slices cover `kb` pairs (asserted above).
    unsafe {
        match kernel {
            Bf16Kernel::Avx512Bf16 if t.by_rows => x86::tile_bf16::<KCP>(t),
            Bf16Kernel::Avx512Bf16 => x86::tile_bf16::<0>(t),
            Bf16Kernel::Avx512F if t.by_rows => x86::tile_fma::<KCP>(t),
            Bf16Kernel::Avx512F => x86::tile_fma::<0>(t),
            Bf16Kernel::Portable | Bf16Kernel::Amx => {
                unreachable!("the portable and AMX routes do not take register tiles")
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("packed bf16 kernels are x86-64 only ({kernel:?})");
}

#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    use std::arch::x86_64::*;

    use super::{Tile, MR, NR};

    /// One pair step with `vdpbf16ps`: `acc[i] += a.lo·b.lo + a.hi·b.hi` per lane (also the
    /// step of the dropped-element passes, `super::super::dropped`).
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[inline]
    pub(in crate::ops::bf16) fn dot_bf16(acc: __m512, a: __m512i, b: __m512i) -> __m512 {
        // SAFETY: both are 512-bit vectors; the bf16 vector type is the same bits.
        let (a, b) = unsafe {
            (
                std::mem::transmute::<__m512i, __m512bh>(a),
                std::mem::transmute::<__m512i, __m512bh>(b),
            )
        };
        _mm512_dpbf16_ps(acc, a, b)
    }

    /// The same step as two f32 FMAs (low halves, then high halves, widened by shifting or
    /// masking the bits into place: a bf16 is the top half of an f32).
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn dot_fma(acc: __m512, a: __m512i, b: __m512i) -> __m512 {
        let hi = _mm512_set1_epi32(0xffff_0000u32 as i32);
        let lo = |v| _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v));
        let high = |v| _mm512_castsi512_ps(_mm512_and_si512(v, hi));
        let acc = _mm512_fmadd_ps(lo(a), lo(b), acc);
        _mm512_fmadd_ps(high(a), high(b), acc)
    }

    macro_rules! tile_kernel {
        ($name:ident, $features:literal, $dot:ident) => {
            /// One register tile (see the module comment).
            ///
            /// # Safety
            /// As `run_tile`: the CPU has the features; the slices hold `kb` pairs.
            #[target_feature(enable = $features)]
            pub(super) unsafe fn $name<const LDA: usize>(t: &Tile<'_>) {
                let mut acc = [[_mm512_setzero_ps(); 2]; MR];
                let (a, b) = (t.a.as_ptr(), t.b.as_ptr());
                for p in 0..t.kb {
                    // SAFETY: p < kb, and the panels hold kb·NR and kb·MR pairs.
                    let (b0, b1) = unsafe {
                        (
                            _mm512_loadu_si512(b.add(p * NR).cast()),
                            _mm512_loadu_si512(b.add(p * NR + 16).cast()),
                        )
                    };
                    for (r, row) in acc.iter_mut().enumerate() {
                        // SAFETY: as above.
                        let at = if LDA == 0 { p * MR + r } else { r * LDA + p };
                        let av = _mm512_set1_epi32(unsafe { *a.add(at) } as i32);
                        row[0] = $dot(row[0], av, b0);
                        row[1] = $dot(row[1], av, b1);
                    }
                }
                let s = _mm512_set1_ps(t.scale);
                for (r, row) in acc.iter().enumerate().take(t.mr) {
                    for (h, v) in row.iter().enumerate() {
                        let cnt = t.nr.saturating_sub(16 * h).min(16);
                        if cnt == 0 {
                            continue;
                        }
                        let mask: __mmask16 = if cnt == 16 { 0xffff } else { (1 << cnt) - 1 };
                        // SAFETY: row r < mr and the masked lanes < nr lie in the output
                        // block (the caller's contract); masked-off lanes are not touched.
                        unsafe {
                            let p = t.c.add(r * t.ldc + 16 * h);
                            let mut y = _mm512_mul_ps(*v, s);
                            if !t.overwrite {
                                y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(mask, p));
                            }
                            _mm512_mask_storeu_ps(p, mask, y);
                        }
                    }
                }
            }
        };
    }

    tile_kernel!(tile_bf16, "avx512f,avx512bf16", dot_bf16);
    tile_kernel!(tile_fma, "avx512f", dot_fma);
}
