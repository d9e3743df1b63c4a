//! The AMX route of the bf16 products (`amx` kernel set: Sapphire Rapids and later Xeons).
//!
//! AMX holds eight tile registers of 16 rows × 64 bytes; `tdpbf16ps` adds the product of a
//! 16 × 32 bf16 tile (16 rows of 16 pairs) and a 16 pairs × 16 columns tile into a 16 × 16 f32
//! tile: 16 384 operations in one instruction, about four times what the core's two f32 FMA
//! ports do in the same time on the machines measured (docs/PERFORMANCE.md). The register tile
//! is 2 × 2 output tiles (a 32 × 32 block) fed by two left and two right tiles per step of 16
//! pairs — the most the eight registers allow.
//!
//! Packing, both as bf16 pairs along the reduction axis (one `u32` per pair, the lower row in
//! the low half, as [`PairRows`] writes them): the left operand whole, in panels of
//! [`MB`] rows, each a run of 16-pair chunks stored row-major (`[chunk][row][16 pairs]`, so a
//! left tile is 1 KiB with rows 64 bytes apart); the right one per task, panels of [`NB`]
//! columns over the whole reduction (`[pair][column]`, so a right tile is 16 pairs with rows
//! 128 bytes apart). The reduction is padded with zero pairs to whole chunks and the edges with
//! zero rows and columns; a 32 × 32 block sums the whole reduction in its tiles, then leaves
//! them once through a scratch block, from which only the valid part is scaled and written (or
//! added).
//!
//! Linux grants a process the tile state only on request (`arch_prctl(ARCH_REQ_XCOMP_PERM)`),
//! which [`available`] makes once; a CPU or kernel without it keeps the other kernel sets.

use std::sync::OnceLock;

use rayon::prelude::*;

use super::passes::{self, return_buffer, take_buffer, Split, A_BUFFER, B_BUFFER};
use super::PairRows;
use crate::ops::mat::{Accum, MatMut, Par};

/// Rows of a left panel (two tiles).
pub(super) const MB: usize = 32;
/// Columns of a right panel (two tiles).
pub(super) const NB: usize = 32;
/// Pairs per tile step (a tile row of 64 bytes).
pub(super) const QP: usize = 16;
/// Tile steps per reduction block (256 pairs, 512 values): the unit in which a long
/// reduction is sliced into passes.
pub(super) const KCQ: usize = 16;
/// Left panels that pass one right panel while it stays in L2.
const MCP: usize = 8;
/// Most right panels one task packs (512 columns).
const TASK_PANELS: usize = 16;
/// Most bytes of packed right panels one task holds, one panel at the least (each panel spans
/// the whole reduction of the pass, so a longer reduction gives a task fewer columns).
const TASK_B_BYTES: usize = 1 << 20;

/// Whether this CPU and kernel run AMX tiles with bf16 products (asked once per process; the
/// first call requests the tile state from Linux).
pub(super) fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(detect)
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn detect() -> bool {
    use std::arch::x86_64::__cpuid_count;
    // CPUID.(EAX=7, ECX=0):EDX bit 22 = AMX-BF16, bit 24 = AMX-TILE.
    // Leaf 7 is read only where leaf 0 reports it.
    if __cpuid_count(0, 0).eax < 7 {
        return false;
    }
    let edx = __cpuid_count(7, 0).edx;
    if edx & (1 << 22) == 0 || edx & (1 << 24) == 0 {
        return false;
    }
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with these arguments only asks for a permission; it returns an
    // error (and changes nothing) where the kernel does not know it.
    let r = unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        )
    };
    r == 0
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn detect() -> bool {
    false
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
    /// Columns `j..j + len` of row `i`.
    ///
    /// # Safety
    /// They must lie in the output, and no one else may touch them while the slice lives.
    #[allow(clippy::mut_from_ref)]
    unsafe fn row(&self, i: usize, j: usize, len: usize) -> &mut [f32] {
        // SAFETY: the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(i * self.rs + j), len) }
    }
}

/// `dst [+]= scale · lhs · rhs` on AMX tiles (see the module comment). The caller checked
/// [`available`].
pub(super) fn gemm(
    dst: MatMut<'_>,
    acc: Accum,
    lhs_t: &dyn PairRows,
    rhs: &dyn PairRows,
    scale: f32,
    par: Par,
) {
    passes::in_passes(
        dst,
        acc,
        lhs_t,
        rhs,
        scale,
        par,
        (MB, 2 * QP * KCQ),
        gemm_pass,
    );
}

/// One pass of [`gemm`] over the whole reduction, the left operand packed whole.
fn gemm_pass(
    mut dst: MatMut<'_>,
    acc: Accum,
    lhs_t: &dyn PairRows,
    rhs: &dyn PairRows,
    scale: f32,
    par: Par,
) {
    let (m, n, k) = (dst.rows(), dst.cols(), lhs_t.rows());
    let chunks = k.div_ceil(2 * QP);
    let (mpan, npan) = (m.div_ceil(MB), n.div_ceil(NB));
    let threads = match par {
        Par::All if 2 * m * n * k >= 1 << 20 => rayon::current_num_threads(),
        _ => 1,
    };
    let panel_len = chunks * QP * MB;
    let mut apack = take_buffer(&A_BUFFER, mpan * panel_len);
    let pack_a = |(ip, panel): (usize, &mut [u32])| {
        let i0 = ip * MB;
        for (q, tile) in panel.chunks_exact_mut(QP * MB).enumerate() {
            lhs_t.pack_pairs_by_column(2 * QP * q, QP, i0, MB.min(m - i0), MB, tile);
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
    let block = chunks * QP * NB;
    let most_panels = (TASK_B_BYTES / (4 * block)).clamp(1, TASK_PANELS);
    let split = Split::new(npan, mpan, threads, most_panels);
    let (ptr, rs) = dst.raw();
    let out = Out { ptr, rs };
    let a_panels = &apack;
    let task = |t: usize| {
        let (cols, rows) = split.panels(t);
        let (jp0, jp1, ip0, ip1) = (cols.start, cols.end, rows.start, rows.end);
        let mut bpack = take_buffer(&B_BUFFER, block * (jp1 - jp0));
        let mut scratch = Scratch([0f32; MB * NB]);
        let tiles = x86::Tiles::configure();
        for jp in jp0..jp1 {
            let j0 = jp * NB;
            let panel = &mut bpack[(jp - jp0) * block..][..block];
            rhs.pack_pairs(0, chunks * QP, j0, NB.min(n - j0), NB, panel);
        }
        // Each 32 × 32 block sums the whole reduction in its tiles and leaves them once:
        // adding a block's partial sums into an output that has left the cache meanwhile
        // had cost a third of this kernel's time.
        let overwrite = acc == Accum::Write;
        for ib in (ip0..ip1).step_by(MCP) {
            for jp in jp0..jp1 {
                let b = &bpack[(jp - jp0) * block..][..block];
                for ip in ib..(ib + MCP).min(ip1) {
                    let a = &a_panels[ip * panel_len..][..panel_len];
                    tiles.block(chunks, a, b, &mut scratch.0);
                    let (i0, j0) = (ip * MB, jp * NB);
                    let (mr, nr) = (MB.min(m - i0), NB.min(n - j0));
                    for (r, sums) in scratch.0.chunks_exact(NB).take(mr).enumerate() {
                        // SAFETY: row i0 + r < m and columns j0..j0 + nr < n are this
                        // task's block of the output, which no other task touches.
                        let row = unsafe { out.row(i0 + r, j0, nr) };
                        if overwrite {
                            for (y, s) in row.iter_mut().zip(sums) {
                                *y = scale * s;
                            }
                        } else {
                            for (y, s) in row.iter_mut().zip(sums) {
                                *y += scale * s;
                            }
                        }
                    }
                }
            }
        }
        drop(tiles);
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
        // SAFETY: every 32 × 32 block of the output was written once, overwriting it.
        unsafe { dst.assume_init() };
    }
}

/// The 32 × 32 f32 sums of one block, as they leave the tiles (64-byte aligned, as tile
/// stores prefer).
#[repr(C, align(64))]
struct Scratch([f32; MB * NB]);

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::asm;
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};

    use super::{MB, NB, QP};

    /// Tile steps ahead that [`Tiles::block`] prefetches both operands into L1: two steps ahead
    /// measured 4–10 % faster products than none (docs/PERFORMANCE.md, session 17).
    const PREFETCH_STEPS: usize = 2;

    /// The tile configuration `ldtilecfg` reads: palette 1, all eight tiles 16 rows × 64 bytes.
    #[repr(C, align(64))]
    struct Config([u8; 64]);

    /// This thread's tiles, configured for the 2 × 2 block; released when dropped.
    pub(super) struct Tiles(());

    impl Tiles {
        /// Loads the tile configuration on this thread (the caller checked that AMX is
        /// available and permitted).
        pub(super) fn configure() -> Self {
            let mut cfg = [0u8; 64];
            cfg[0] = 1;
            for t in 0..8 {
                cfg[16 + 2 * t] = 64;
                cfg[48 + t] = 16;
            }
            let cfg = Config(cfg);
            // SAFETY: a valid palette-1 configuration; AMX is available and the process holds
            // the tile-state permission (`available`).
            unsafe { asm!("ldtilecfg [{0}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly)) };
            Tiles(())
        }

        /// `out (32 × 32, row-major) = Σ over qb steps of a-tiles · b-tiles`: `a` holds `qb`
        /// chunks of 32 rows × 16 pairs, `b` `qb · 16` pairs × 32 columns.
        pub(super) fn block(&self, qb: usize, a: &[u32], b: &[u32], out: &mut [f32; MB * NB]) {
            assert!(a.len() >= qb * QP * MB && b.len() >= qb * QP * NB);
            let (sa, sb, so) = (4 * QP, 4 * NB, 4 * NB);
            // SAFETY: the tiles are configured on this thread (`self`); every load reads 16
            // rows of 64 bytes inside `a` or `b` (the assert above), and the stores write
            // 16 rows of 64 bytes inside `out`; prefetches only hint at lines inside `a` and `b`.
            unsafe {
                asm!(
                    "tilezero tmm0",
                    "tilezero tmm1",
                    "tilezero tmm2",
                    "tilezero tmm3",
                    options(nostack, nomem)
                );
                for q in 0..qb {
                    let a0 = a.as_ptr().add(q * QP * MB);
                    let b0 = b.as_ptr().add(q * QP * NB);
                    if q + PREFETCH_STEPS < qb {
                        // The tiles of step q + PREFETCH_STEPS, into L1: 2 KiB of each operand,
                        // 32 lines apiece (MB = NB), inside `a` and `b` since that step exists.
                        let pa = a0.add(PREFETCH_STEPS * QP * MB).cast::<i8>();
                        let pb = b0.add(PREFETCH_STEPS * QP * NB).cast::<i8>();
                        for line in 0..QP * MB * 4 / 64 {
                            _mm_prefetch::<_MM_HINT_T0>(pa.add(64 * line));
                            _mm_prefetch::<_MM_HINT_T0>(pb.add(64 * line));
                        }
                    }
                    asm!(
                        "tileloadd tmm4, [{a0} + {sa}*1]",
                        "tileloadd tmm6, [{b0} + {sb}*1]",
                        "tdpbf16ps tmm0, tmm4, tmm6",
                        "tileloadd tmm7, [{b1} + {sb}*1]",
                        "tdpbf16ps tmm1, tmm4, tmm7",
                        "tileloadd tmm5, [{a1} + {sa}*1]",
                        "tdpbf16ps tmm2, tmm5, tmm6",
                        "tdpbf16ps tmm3, tmm5, tmm7",
                        a0 = in(reg) a0,
                        a1 = in(reg) a0.add(QP * QP),
                        b0 = in(reg) b0,
                        b1 = in(reg) b0.add(16),
                        sa = in(reg) sa,
                        sb = in(reg) sb,
                        options(nostack, readonly)
                    );
                }
                let o = out.as_mut_ptr();
                asm!(
                    "tilestored [{c0} + {so}*1], tmm0",
                    "tilestored [{c1} + {so}*1], tmm1",
                    "tilestored [{c2} + {so}*1], tmm2",
                    "tilestored [{c3} + {so}*1], tmm3",
                    c0 = in(reg) o,
                    c1 = in(reg) o.add(16),
                    c2 = in(reg) o.add(16 * NB),
                    c3 = in(reg) o.add(16 * NB + 16),
                    so = in(reg) so,
                    options(nostack)
                );
            }
        }
    }

    impl Drop for Tiles {
        fn drop(&mut self) {
            // SAFETY: releases this thread's tile state, loaded by `configure`.
            unsafe { asm!("tilerelease", options(nostack, nomem)) };
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod x86 {
    use super::{MB, NB};

    /// No tiles off x86-64 (`available` is false there, so nothing constructs this).
    pub(super) struct Tiles(());

    impl Tiles {
        pub(super) fn configure() -> Self {
            unreachable!("AMX is x86-64 only")
        }
        pub(super) fn block(&self, _: usize, _: &[u32], _: &[u32], _: &mut [f32; MB * NB]) {
            unreachable!("AMX is x86-64 only")
        }
    }
}
