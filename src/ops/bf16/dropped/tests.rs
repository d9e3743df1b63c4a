use half::bf16;

use super::*;
use crate::ops::bf16::Bf16Ref;
use crate::ops::Rng;

/// Random values rounded to bf16 (so a product of two is exact in f32 and the references in
/// f64 see the values the kernels multiply).
fn bf16_values(len: usize, rng: &mut Rng) -> Vec<f32> {
    (0..len).map(|_| from_bits(to_bits(rng.normal()))).collect()
}

/// `Σ_o a[i, o]·w[o, j]`-style reference sums in f64 with their `Σ|terms|` (for the tolerance).
fn dot64(a: impl Iterator<Item = (f32, f32)>) -> (f64, f64) {
    a.fold((0.0, 0.0), |(s, m), (x, y)| {
        let t = x as f64 * y as f64;
        (s + t, m + t.abs())
    })
}

/// f32 sums of `k` terms: `|got − want| ≤ (k + 3)·2⁻²³·Σ|terms|` (a worst-case bound on
/// recursive summation's rounding, with room for the split sums and the final scaling).
fn assert_close(got: f32, want: f64, mag: f64, k: usize, what: &str) {
    let tol = (k + 3) as f64 * f32::EPSILON as f64 * mag.max(1e-30);
    assert!(
        (got as f64 - want).abs() <= tol,
        "{what}: {got} against {want} (tolerance {tol:e})"
    );
}

/// The kernels to check: the portable loops, and `vdpbf16ps` where the CPU has it.
fn kernels() -> Vec<bool> {
    if native() {
        vec![false, true]
    } else {
        println!("skipped the vdpbf16ps passes: this CPU lacks AVX512_BF16 (portable checked)");
        vec![false]
    }
}

#[test]
fn the_list_holds_exactly_the_dropped_elements() {
    for (n, inp, p) in [(5, 69, 0.1), (33, 16, 0.5), (3, 7, 0.3), (2, 1, 0.9)] {
        let mask = KeepMask::new(p, 0x5eed_0000 + inp as u64);
        let d = Dropped::list(&mask, n, inp, None);
        for i in 0..n {
            let mut want = Vec::new();
            for q in 0..inp.div_ceil(2) {
                let lo = !mask.kept(i * inp + 2 * q);
                let hi = 2 * q + 1 < inp && !mask.kept(i * inp + 2 * q + 1);
                if lo || hi {
                    want.push((q as u32) << 2 | u32::from(lo) | u32::from(hi) << 1);
                }
            }
            assert_eq!(d.row(i).0, &want[..], "row {i} of {n} × {inp}, p {p}");
        }
    }
}

/// `x_d·Wᵀ` from `x·Wᵀ` and the dropped elements against `c·Σ_kept x·w` in f64, for panel
/// widths 64, 32 (in > 3072) and 16 (in > 6144), odd inputs, outputs off a whole panel, and a
/// high drop rate (pairs with both elements dropped).
#[test]
fn forward_matches_the_dropped_out_product() {
    let mut rng = Rng::new(11);
    for (n, inp, out, p) in [
        (7, 69, 45, 0.1),
        (4, 64, 130, 0.5),
        (3, 1600, 70, 0.1),
        (2, 3201, 40, 0.1),
        (1, 12300, 20, 0.1),
    ] {
        let x = bf16_values(n * inp, &mut rng);
        let w32 = bf16_values(out * inp, &mut rng);
        let w: Vec<bf16> = w32.iter().map(|&v| bf16::from_f32(v)).collect();
        let wt = Bf16Ref::new(&w, out, inp).t();
        let mask = KeepMask::new(p, 99 + inp as u64);
        let c = mask.keep_scale();
        let y: Vec<f32> = (0..n * out)
            .map(|e| {
                let (i, o) = (e / out, e % out);
                dot64((0..inp).map(|j| (x[i * inp + j], w32[o * inp + j]))).0 as f32
            })
            .collect();
        for native in kernels() {
            let y2 = forward_with(&x, &y, n, &wt, &mask, native);
            for i in 0..n {
                for o in 0..out {
                    let kept = (0..inp).filter(|&j| mask.kept(i * inp + j));
                    let (s, _) = dot64(kept.map(|j| (x[i * inp + j], w32[o * inp + j])));
                    let (_, mag) = dot64((0..inp).map(|j| (x[i * inp + j], w32[o * inp + j])));
                    let what = format!("y2[{i}, {o}] of {n}×{inp}·{out}, native {native}");
                    assert_close(y2[i * out + o], c as f64 * s, c as f64 * mag, inp, &what);
                }
            }
        }
    }
}

/// `dy·W + c·M⊙(g·W)` as `(dy + c·g)·W − c·(1−M)⊙(g·W)` against f64, with `g` in bf16 values
/// (what the sampled term multiplies), the dense product an f64 reference, over blocks of
/// inputs cut for a long (1100) and a short output row.
#[test]
fn backward_matches_both_input_gradients() {
    let mut rng = Rng::new(12);
    for (n, inp, out, p) in [(6, 71, 40, 0.1), (3, 50, 1100, 0.5), (5, 400, 33, 0.1)] {
        let dy = bf16_values(n * out, &mut rng);
        let g0 = bf16_values(n * out, &mut rng);
        let w32 = bf16_values(out * inp, &mut rng);
        let w: Vec<bf16> = w32.iter().map(|&v| bf16::from_f32(v)).collect();
        let wt = Bf16Ref::new(&w, out, inp);
        let mask = KeepMask::new(p, 7 + out as u64);
        let c = mask.keep_scale() as f64;
        let times_w = |a: &[f32]| -> Vec<f32> {
            (0..n * inp)
                .map(|e| {
                    let (i, j) = (e / inp, e % inp);
                    dot64((0..out).map(|o| (a[i * out + o], w32[o * inp + j]))).0 as f32
                })
                .collect()
        };
        for native in kernels() {
            let mut g = g0.clone();
            let dx = backward_with(&dy, &mut g, n, &wt, &mask, times_w, native);
            for i in 0..n {
                for j in 0..inp {
                    let terms =
                        |a: &[f32]| dot64((0..out).map(|o| (a[i * out + o], w32[o * inp + j])));
                    let ((d, dm), (s, sm)) = (terms(&dy), terms(&g0));
                    let m = if mask.kept(i * inp + j) { c } else { 0.0 };
                    let what = format!("dx[{i}, {j}] of {n}×{out}·{inp}, native {native}");
                    // the dense product sums dy + c·g, rounded to f32 per element
                    let mag = dm + 2.0 * c * sm;
                    assert_close(dx[i * inp + j], d + m * s, mag, out + 2, &what);
                }
            }
        }
    }
}
