//! Every kernel set against an f64 product of the same bf16 values, on the tile edges.
//!
//! Tolerance: each kernel multiplies bf16 values exactly (8-bit significands, so a product fits
//! an f32) and rounds only its sums, in some order, plus the scaling and the add into `dst`;
//! the classic bound for `k` rounded f32 sums is `|Δ| ≤ γ·Σ|aᵢbᵢ|` with `γ = (k + 3)·2⁻²³`
//! (unit roundoff 2⁻²⁴, doubled for slack), which the test asserts per element. A kernel set
//! this CPU lacks is reported as skipped.

use half::bf16;

use super::amx::{KCQ, MB, NB, QP};
use super::packed::{KCP, MR, NR};
use super::passes::{Split, A_PACK_MAX};
use super::*;
use crate::ops::Rng;

fn values(n: usize, rng: &mut Rng) -> Vec<f32> {
    (0..n).map(|_| rng.normal()).collect()
}

/// Checks `gemm_bf16_with(kernel, …)` for `lhs (m×k)` and `rhs (k×n)` (f32 lhs rounded while
/// packing, bf16 rhs, optionally read transposed), with `Write` and then `Add` at `scale`.
fn check(kernel: Bf16Kernel, (m, n, k): (usize, usize, usize), transposed_rhs: bool, par: Par) {
    let mut rng = Rng::new((m * 31 + n * 7 + k) as u64);
    let a = values(m * k, &mut rng);
    let b: Vec<bf16> = values(k * n, &mut rng)
        .into_iter()
        .map(bf16::from_f32)
        .collect();
    let bt: Vec<bf16> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
    let lhs = MatRef::new(&a, m, k);
    let rhs = if transposed_rhs {
        Bf16Ref::new(&bt, n, k).t()
    } else {
        Bf16Ref::new(&b, k, n)
    };
    let scale = 0.75f32;
    let mut c = vec![0f32; m * n];
    // SAFETY: a Write product covers its whole view.
    let written = unsafe {
        crate::ops::uninit::new_matrix(m, n, |y| {
            gemm_bf16_with(kernel, y, Accum::Write, &lhs.t(), &rhs, 1.0, par)
        })
    };
    c.copy_from_slice(&written);
    gemm_bf16_with(
        kernel,
        MatMut::new(&mut c, m, n),
        Accum::Add,
        &lhs.t(),
        &rhs,
        scale,
        par,
    );
    let gamma = (k + 3) as f64 * f32::EPSILON as f64;
    for i in 0..m {
        for j in 0..n {
            let (mut dot, mut mag) = (0f64, 0f64);
            for l in 0..k {
                let p = bf16::from_f32(a[i * k + l]).to_f64() * b[l * n + j].to_f64();
                dot += p;
                mag += p.abs();
            }
            let (w, got) = (written[i * n + j] as f64, c[i * n + j] as f64);
            assert!(
                (w - dot).abs() <= gamma * mag,
                "{} {m}×{n}×{k} write ({i}, {j}): {w} vs {dot}",
                kernel.name()
            );
            let want = (1.0 + scale as f64) * dot;
            assert!(
                (got - want).abs() <= 2.0 * gamma * mag,
                "{} {m}×{n}×{k} add ({i}, {j}): {got} vs {want}",
                kernel.name()
            );
        }
    }
}

/// The shapes: partial and whole register tiles, odd reductions, several reduction blocks,
/// more column panels than one task packs, and products split over tasks by rows.
fn shapes() -> Vec<(usize, usize, usize)> {
    let mut s = vec![];
    for m in [1, MR - 1, MR, MR + 1, 3 * MR + 5] {
        for n in [1, 15, 16, 17, NR - 1, NR, NR + 1, 2 * NR + 3] {
            for k in [1, 2, 3, 8, 33] {
                s.push((m, n, k));
            }
        }
    }
    s.extend([
        (MR + 3, NR + 5, 2 * KCP + 1),
        (2 * MR, NR, 4 * KCP + 6),
        (7, 17 * NR + 9, 65),
        (8 * MR + 1, 40, 130),
        (200, 33, 40),
        // AMX: partial and whole 32 × 32 blocks, partial 16-pair steps, reductions longer
        // than one KCQ block (summed in the tiles in one go)
        (MB - 1, NB + 1, 2 * QP + 1),
        (MB, NB, 2 * QP),
        (MB + 1, 2 * NB - 1, 2 * QP * KCQ + 3),
        (3 * MB + 17, 5 * NB + 7, 4 * QP * KCQ + 66),
        (16, 16, 4 * QP - 1),
        // AMX: a reduction longer than one pass packs (1024 padded rows: passes of 4096),
        // ending in a one-row slice
        (1000, 37, 4097),
    ]);
    assert_eq!(
        A_PACK_MAX / 1024 * 2,
        4096,
        "the long-reduction shape's passes"
    );
    s
}

#[test]
fn every_kernel_set_matches_the_f64_product() {
    for kernel in Bf16Kernel::ALL {
        if !kernel.available() {
            println!(
                "skipped: bf16 kernel set {} is not available on this CPU",
                kernel.name()
            );
            continue;
        }
        for (i, &shape) in shapes().iter().enumerate() {
            check(kernel, shape, i % 2 == 1, Par::Serial);
        }
        for shape in [(96, 300, 70), (40, 1000, 390), (150, 20, 9)] {
            check(kernel, shape, false, Par::All);
            check(kernel, shape, true, Par::All);
        }
    }
}

/// Native kernels against the portable route element by element (the bound of two different
/// summation orders of the same exact products).
#[test]
fn packed_kernels_agree_with_portable() {
    let (m, n, k) = (37, 70, 2 * KCP + 9);
    let mut rng = Rng::new(11);
    let (a, b) = (values(m * k, &mut rng), values(k * n, &mut rng));
    let run = |kernel| {
        let mut c = vec![0f32; m * n];
        let (lhs, rhs) = (MatRef::new(&a, m, k), MatRef::new(&b, k, n));
        gemm_bf16_with(
            kernel,
            MatMut::new(&mut c, m, n),
            Accum::Write,
            &lhs.t(),
            &rhs,
            1.0,
            Par::All,
        );
        c
    };
    let reference = run(Bf16Kernel::Portable);
    let gamma = 2.0 * (k + 3) as f32 * f32::EPSILON;
    let mut ran = 0;
    for kernel in [Bf16Kernel::Amx, Bf16Kernel::Avx512Bf16, Bf16Kernel::Avx512F] {
        if !kernel.available() {
            println!("skipped: {} not available on this CPU", kernel.name());
            continue;
        }
        ran += 1;
        let got = run(kernel);
        for i in 0..m {
            for j in 0..n {
                let mag: f32 = (0..k)
                    .map(|l| {
                        (from_bits(to_bits(a[i * k + l])) * from_bits(to_bits(b[l * n + j]))).abs()
                    })
                    .sum();
                let (g, r) = (got[i * n + j], reference[i * n + j]);
                assert!(
                    (g - r).abs() <= gamma * mag,
                    "{} ({i}, {j}): {g} vs {r}",
                    kernel.name()
                );
            }
        }
    }
    println!("{ran} native kernel set(s) compared with portable");
}

#[test]
fn rounding_is_to_nearest_even() {
    // 1 + 2⁻⁸ is halfway between bf16 1.0 and 1 + 2⁻⁷: ties go to the even significand.
    assert_eq!(from_bits(to_bits(1.0 + 1.0 / 256.0)), 1.0);
    assert_eq!(from_bits(to_bits(1.0 + 3.0 / 256.0)), 1.0 + 4.0 / 256.0);
    assert!(from_bits(to_bits(f32::NAN)).is_nan());
    let v = [0.1f32, -3.3, 1e-3];
    let w = widen_slice(&round_slice(&v));
    for (a, b) in v.iter().zip(&w) {
        assert!((a - b).abs() <= a.abs() / 256.0);
    }
}

#[test]
fn zero_reduction_writes_zeros() {
    for kernel in Bf16Kernel::ALL.into_iter().filter(|k| k.available()) {
        let mut c = vec![5f32; 6];
        let e: [f32; 0] = [];
        gemm_bf16_with(
            kernel,
            MatMut::new(&mut c, 2, 3),
            Accum::Write,
            &MatRef::new(&e, 0, 2),
            &MatRef::new(&e, 0, 3),
            1.0,
            Par::Serial,
        );
        assert_eq!(c, vec![0.0; 6]);
    }
}

/// `matmul_nt` and `matmul_nn` on both sides of [`GEMV_ROWS`] (the few-row path reads each
/// weight row once), against f64 sums of the same bf16 values, with the bound above.
#[test]
fn weight_products_match_the_f64_product() {
    let (out, inp) = (37, 53);
    let mut rng = Rng::new(11);
    let w = round_slice(&values(out * inp, &mut rng));
    let wf = widen_slice(&w);
    let gamma = (inp.max(out) + 3) as f64 * f32::EPSILON as f64;
    let r = |v: f32| from_bits(to_bits(v)) as f64;
    for n in [1, 3, GEMV_ROWS, GEMV_ROWS + 1, 9] {
        let x = values(n * inp, &mut rng);
        let y = matmul_nt(&x, n, &w, out, inp);
        for i in 0..n {
            for o in 0..out {
                let terms = (0..inp).map(|j| r(x[i * inp + j]) * wf[o * inp + j] as f64);
                let (want, mag) = terms.fold((0.0, 0.0), |(s, m), t| (s + t, m + t.abs()));
                let got = y[i * out + o] as f64;
                assert!(
                    (got - want).abs() <= gamma * mag,
                    "nt n={n} ({i},{o}): {got} vs {want}"
                );
            }
        }
        let dy = values(n * out, &mut rng);
        let dx = matmul_nn(&dy, n, &w, out, inp);
        for i in 0..n {
            for j in 0..inp {
                let terms = (0..out).map(|o| r(dy[i * out + o]) * wf[o * inp + j] as f64);
                let (want, mag) = terms.fold((0.0, 0.0), |(s, m), t| (s + t, m + t.abs()));
                let got = dx[i * inp + j] as f64;
                assert!(
                    (got - want).abs() <= gamma * mag,
                    "nn n={n} ({i},{j}): {got} vs {want}"
                );
            }
        }
    }
}

/// `to_bits` (branch-free) gives `half`'s bits on every exponent, both signs, the ties
/// (even and odd), the largest finite values (which round to infinity), infinities,
/// subnormals and NaNs.
#[test]
fn rounding_matches_half_bit_for_bit() {
    let mut patterns: Vec<u32> = Vec::new();
    for hi in 0..=0xffffu32 {
        for lo in [0, 1, 0x7fff, 0x8000, 0x8001, 0xffff, 0x4000, 0xc000, 0x1234] {
            patterns.push(hi << 16 | lo);
        }
    }
    let mut s = 0x9e37_79b9u32;
    for _ in 0..1 << 18 {
        s ^= s << 13;
        s ^= s >> 17;
        s ^= s << 5;
        patterns.push(s);
    }
    for b in patterns {
        let x = f32::from_bits(b);
        assert_eq!(to_bits(x), bf16::from_f32(x).to_bits(), "{b:#010x} ({x:e})");
    }
}

/// A 37 × 11 matrix held four ways for the packing tests: f32 and bf16, row-major (contiguous
/// across the reduction axis) and as the transpose of a row-major matrix (contiguous along it).
struct PackViews {
    v: Vec<f32>,
    vt: Vec<f32>,
    h: Vec<bf16>,
    ht: Vec<bf16>,
}

impl PackViews {
    const ROWS: usize = 37;
    const COLS: usize = 11;

    fn new(seed: u64) -> Self {
        let (rows, cols) = (Self::ROWS, Self::COLS);
        let v = values(rows * cols, &mut Rng::new(seed));
        let vt: Vec<f32> = (0..rows * cols)
            .map(|i| v[(i % rows) * cols + i / rows])
            .collect();
        let h = v.iter().map(|&x| bf16::from_f32(x)).collect();
        let ht = vt.iter().map(|&x| bf16::from_f32(x)).collect();
        PackViews { v, vt, h, ht }
    }

    fn views(&self) -> [(&'static str, Box<dyn PairRows + '_>); 4] {
        let (rows, cols) = (Self::ROWS, Self::COLS);
        [
            ("f32 rows", Box::new(MatRef::new(&self.v, rows, cols))),
            (
                "f32 contiguous",
                Box::new(MatRef::new(&self.vt, cols, rows).t()),
            ),
            ("bf16 rows", Box::new(Bf16Ref::new(&self.h, rows, cols))),
            (
                "bf16 contiguous",
                Box::new(Bf16Ref::new(&self.ht, cols, rows).t()),
            ),
        ]
    }
}

/// Column-by-column packing holds the same pairs as [`PairRows::pack_pairs`], transposed, on
/// every route: f32 and bf16 views with a contiguous reduction axis (the fast routes) and
/// without (element by element), with odd row counts, blocks past the end and padded columns.
#[test]
fn packing_by_column_transposes_packing_by_pair() {
    let data = PackViews::new(3);
    let views = data.views();
    for (name, view) in &views {
        for (k0, kp, j0, nj, width) in [(0, 19, 0, 11, 16), (4, 16, 3, 5, 8), (30, 8, 10, 1, 4)] {
            let mut by_pair = vec![7u32; kp * width];
            let mut by_column = vec![7u32; kp * width];
            view.pack_pairs(k0, kp, j0, nj, width, &mut by_pair);
            view.pack_pairs_by_column(k0, kp, j0, nj, width, &mut by_column);
            for p in 0..kp {
                for j in 0..width {
                    assert_eq!(
                        by_column[j * kp + p],
                        by_pair[p * width + j],
                        "{name} k0={k0} pair {p} column {j}"
                    );
                }
            }
        }
    }
}

/// The fast packing routes (`pack`: views contiguous along the reduction axis or across it)
/// write the same pairs as element-by-element packing, zeros included: odd row counts, a block
/// that starts on the last row, blocks past the end, padded columns, an empty block.
#[test]
fn fast_packing_matches_element_by_element() {
    let data = PackViews::new(4);
    let views = data.views();
    let blocks = [
        (0, 19, 0, 11, 16),
        (4, 16, 3, 5, 8),
        (30, 8, 10, 1, 4),
        (36, 3, 2, 9, 12),
        (40, 2, 0, 11, 32),
        (2, 0, 0, 11, 16),
        (0, 4, 0, 0, 8),
        // whole 8 × 8 blocks of the transposing interleave, alone and with tails
        (0, 8, 0, 8, 8),
        (6, 12, 2, 8, 16),
    ];
    for (name, view) in &views {
        for (k0, kp, j0, nj, width) in blocks {
            let mut fast = vec![7u32; kp * width];
            let mut slow = vec![7u32; kp * width];
            view.pack_pairs(k0, kp, j0, nj, width, &mut fast);
            pack_elementwise(view.as_ref(), k0, kp, j0, nj, width, &mut slow);
            assert_eq!(
                fast, slow,
                "{name} k0={k0} kp={kp} j0={j0} nj={nj} width={width}"
            );
        }
    }
}

/// Tasks cover every output panel once, hold even shares (one panel apart at most, `most` at
/// the most), come in a multiple of the threads unless each holds a single column panel, and
/// are at least two per thread where there are panels enough.
#[test]
fn tasks_share_the_panels_evenly() {
    for threads in [1, 2, 3, 4] {
        for npan in [1, 2, 3, 5, 11, 32, 88, 1000] {
            for mpan in [1, 2, 7, 86] {
                for most in [1, 8, 16] {
                    let split = Split::new(npan, mpan, threads, most);
                    let mut seen = vec![0u8; npan * mpan];
                    for t in 0..split.tasks() {
                        let (cols, rows) = split.panels(t);
                        for j in cols {
                            for i in rows.clone() {
                                seen[i * npan + j] += 1;
                            }
                        }
                    }
                    let case = format!("{threads} threads, {npan} × {mpan} panels, {most}");
                    assert!(seen.iter().all(|&c| c == 1), "{case}: coverage");
                    let cols: Vec<usize> = (0..split.tasks())
                        .map(|t| split.panels(t).0.len())
                        .collect();
                    let (lo, hi) = (cols.iter().min().unwrap(), cols.iter().max().unwrap());
                    assert!(hi - lo <= 1 && *hi <= most, "{case}: shares {cols:?}");
                    // a multiple of the threads, unless every task holds a single column panel
                    assert!(
                        split.tasks().is_multiple_of(threads) || *hi == 1,
                        "{case}: {} tasks",
                        split.tasks()
                    );
                    assert!(
                        threads == 1 || split.tasks() >= (2 * threads).min(npan * mpan),
                        "{case}"
                    );
                }
            }
        }
    }
}
