//! The adapter's forward against direct evaluations and its gradients against central
//! differences, on dense and 4-bit bases, for both kinds and both DoRA dropout forms.

use super::*;

fn setup(kind: AdapterKind, dropout: f32) -> (BaseWeight, LoraAdapter, Vec<f32>, usize) {
    setup_on(kind, dropout, false)
}

/// [`setup`] on a dense or an NF4 base (the 4-bit kernels share tiles between products).
fn setup_on(
    kind: AdapterKind,
    dropout: f32,
    quantized: bool,
) -> (BaseWeight, LoraAdapter, Vec<f32>, usize) {
    let (out, inp, r, n) = (5, 8, 2, 3);
    let mut rng = Rng::new(1);
    let w: Vec<f32> = (0..out * inp).map(|_| rng.normal() * 0.5).collect();
    let base = if quantized {
        let opts = crate::quant::QuantizeOptions::default();
        let q = crate::quant::QuantizedWeight::quantize(
            &w,
            &[out, inp],
            crate::quant::Dtype::F32,
            opts,
        );
        BaseWeight::Quant(q.expect("5×8 quantizes"))
    } else {
        BaseWeight::Dense { w, out, inp }
    };
    let opts = AdapterOptions {
        kind,
        r,
        scaling: 1.5,
        dropout,
        dora_dropout: DoraDropout::Peft,
    };
    let mut a = LoraAdapter::new(&base, &opts, InitLoraWeights::Random, &mut rng);
    if let Some(m) = a.param_mut(AdapterParam::Magnitude) {
        for (i, v) in m.iter_mut().enumerate() {
            *v *= 1.0 + 0.1 * i as f32;
        }
    }
    let x: Vec<f32> = (0..n * inp).map(|_| rng.normal()).collect();
    (base, a, x, n)
}

/// DoRA's options with the rank and scaling of `a` and no dropout.
fn dora_options_like(a: &LoraAdapter) -> AdapterOptions {
    AdapterOptions {
        kind: AdapterKind::Dora,
        r: a.r(),
        scaling: a.scaling(),
        dropout: 0.0,
        dora_dropout: DoraDropout::Peft,
    }
}

/// Loss = Σ c ⊙ y with fixed c; compares analytic and central-difference grads.
fn grad_check(kind: AdapterKind, dropout: f32, where_: DoraDropout) {
    grad_check_on(kind, dropout, where_, false);
}

/// What a finite difference perturbs: one of the adapter's tensors, or the input.
#[derive(Clone, Copy, Debug)]
enum Probe {
    Param(AdapterParam),
    Input,
}

fn grad_check_on(kind: AdapterKind, dropout: f32, where_: DoraDropout, quantized: bool) {
    let (base, mut a, x, n) = setup_on(kind, dropout, quantized);
    a.set_dora_dropout(where_);
    let a = a;
    let out = a.out_features();
    let c: Vec<f32> = (0..n * out)
        .map(|i| ((i * 37 % 11) as f32 - 5.0) / 7.0)
        .collect();
    let loss = |ad: &LoraAdapter, x: &[f32]| -> f64 {
        let (y, _) = ad.forward_train(&base, x, n, &mut Rng::new(9));
        y.iter().zip(&c).map(|(y, c)| (y * c) as f64).sum()
    };
    let (_, saved) = a.forward_train(&base, &x, n, &mut Rng::new(9));
    let (dx, g) = a.backward(saved, &base, &x, &c, n);
    let h = 1e-2f32;
    let norm0 = a.weight_norm(&base);
    // DoRA's norm is detached: when A or B move, rescale m so that k = m/‖W+sBA‖ stays put.
    let detach = |p: &mut LoraAdapter| {
        let nn = p.weight_norm(&base);
        if let (Some(m), Some(m0)) = (p.param_mut(AdapterParam::Magnitude), a.magnitude()) {
            for o in 0..m.len() {
                m[o] = m0[o] / norm0[o] * nn[o];
            }
        }
    };
    let check = |probe: Probe, analytic: &[f32]| {
        for i in 0..analytic.len() {
            let eval = |d: f32| {
                let (mut p, mut xp) = (a.clone(), x.clone());
                match probe {
                    Probe::Param(which) => {
                        p.param_mut(which).expect("the adapter has it")[i] += d;
                        if which != AdapterParam::Magnitude {
                            detach(&mut p);
                        }
                    }
                    Probe::Input => xp[i] += d,
                }
                loss(&p, &xp)
            };
            let num = (eval(h) - eval(-h)) / (2.0 * h as f64);
            assert!(
                (num - analytic[i] as f64).abs() < 2e-2 * (1.0 + num.abs()),
                "{probe:?}[{i}]: numeric {num} analytic {}",
                analytic[i]
            );
        }
    };
    let params = a.params().to_vec();
    let grads: Vec<(AdapterParam, Vec<f32>)> = g.into_params().collect();
    assert_eq!(
        grads.iter().map(|(p, _)| *p).collect::<Vec<_>>(),
        params,
        "one gradient per tensor, in order"
    );
    for (p, g) in &grads {
        check(Probe::Param(*p), g);
    }
    check(Probe::Input, &dx);
}

#[test]
fn lora_gradients_match_finite_differences() {
    grad_check(AdapterKind::Lora, 0.0, DoraDropout::Peft);
    grad_check(AdapterKind::Lora, 0.3, DoraDropout::Peft);
}

#[test]
fn dora_gradients_match_finite_differences() {
    for where_ in [DoraDropout::Peft, DoraDropout::LoraOnly] {
        grad_check(AdapterKind::Dora, 0.0, where_);
        grad_check(AdapterKind::Dora, 0.3, where_);
    }
}

/// QDoRA: on a 4-bit base, PEFT's form takes `x·Wᵀ`, `x_d·Wᵀ` and `W·Aᵀ` from one pass of
/// dequantized tiles, and `dy·W` with `((k−1)⊙dy)·W` from another.
#[test]
fn dora_on_a_4bit_base_gradients_match_finite_differences() {
    for where_ in [DoraDropout::Peft, DoraDropout::LoraOnly] {
        grad_check_on(AdapterKind::Dora, 0.3, where_, true);
    }
    grad_check_on(AdapterKind::Lora, 0.3, DoraDropout::Peft, true);
}

/// The two DoRA dropout placements are the formulas they claim, checked against a direct
/// evaluation with the same mask.
#[test]
fn dora_dropout_forms() {
    let (base, mut a, x, n) = setup(AdapterKind::Dora, 0.3);
    let (out, r, s) = (a.out_features(), a.r(), a.scaling());
    let seed = Rng::new(4).next_u64();
    let x_d = Dropout::new(0.3, seed).applied(&x);
    let k = dora::magnitude_scale(a.magnitude().unwrap(), &a.weight_norm(&base));
    let lowrank = {
        let u = ops::matmul_nt(&x_d, n, a.lora_a(), r, a.in_features());
        ops::matmul_nt(&u, n, a.lora_b(), out, r)
    };
    let (yb, ybd) = (base.forward(&x, n), base.forward(&x_d, n));
    for (where_, want) in [
        (
            DoraDropout::Peft,
            (0..n * out)
                .map(|i| yb[i] + (k[i % out] - 1.0) * ybd[i] + k[i % out] * s * lowrank[i])
                .collect::<Vec<_>>(),
        ),
        (
            DoraDropout::LoraOnly,
            (0..n * out)
                .map(|i| k[i % out] * (yb[i] + s * lowrank[i]))
                .collect(),
        ),
    ] {
        a.set_dora_dropout(where_);
        let (y, _) = a.forward_train(&base, &x, n, &mut Rng::new(4));
        for (p, q) in y.iter().zip(&want) {
            assert!((p - q).abs() < 1e-5, "{where_:?}: {p} vs {q}");
        }
    }
}

/// `output_factors` hands back `(z, k)` with `k[o]·z[i, o]` the forward's output to the
/// bit where that holds (DoRA without base dropout), and nothing where it does not.
#[test]
fn output_factors_rebuild_the_output_exactly() {
    for (kind, p, where_, exact) in [
        (AdapterKind::Dora, 0.3, DoraDropout::LoraOnly, true),
        (AdapterKind::Dora, 0.0, DoraDropout::Peft, true),
        (AdapterKind::Dora, 0.3, DoraDropout::Peft, false),
        (AdapterKind::Lora, 0.3, DoraDropout::LoraOnly, false),
    ] {
        let (base, mut a, x, n) = setup(kind, p);
        a.set_dora_dropout(where_);
        let (y, saved) = a.forward_train(&base, &x, n, &mut Rng::new(5));
        // The factored forward forms the output exactly where the factors are not kept.
        let (yf, _) = a.forward_train_factored(&base, &x, n, &mut Rng::new(5));
        match yf {
            Some(yf) => assert!(!exact && yf == y, "{kind:?} {p} {where_:?}"),
            None => assert!(exact, "{kind:?} {p} {where_:?}: no output, no factors"),
        }
        let Some((z, k)) = saved.output_factors() else {
            assert!(!exact, "{kind:?} {p} {where_:?}: no factors");
            continue;
        };
        assert!(exact, "{kind:?} {p} {where_:?}: factors where y ≠ k⊙z");
        let out = a.out_features();
        assert_eq!(z.len(), y.len());
        for (i, (&y, &z)) in y.iter().zip(z.f32().iter()).enumerate() {
            assert_eq!(y.to_bits(), (k[i % out] * z).to_bits(), "element {i}");
        }
    }
}

#[test]
fn forward_equals_forward_train_without_dropout_and_dora_init_equals_lora() {
    for kind in [AdapterKind::Lora, AdapterKind::Dora] {
        let (base, a, x, n) = setup(kind, 0.0);
        let f = a.forward(&base, &x, n);
        let (t, _) = a.forward_train(&base, &x, n, &mut Rng::new(0));
        for (p, q) in f.iter().zip(&t) {
            assert!((p - q).abs() < 1e-6);
        }
    }
    // DoRA with m = ‖W + sBA‖ (fresh init) equals LoRA (PEFT test_4bit_dora_inference).
    let (base, a, x, n) = setup(AdapterKind::Lora, 0.0);
    let m = a.weight_norm(&base);
    let opts = dora_options_like(&a);
    let weights = AdapterWeights {
        lora_a: a.lora_a().to_vec(),
        lora_b: a.lora_b().to_vec(),
        magnitude: Some(m),
    };
    let d = LoraAdapter::from_weights(&base, &opts, weights);
    let l = a.forward(&base, &x, n);
    let dd = d.forward(&base, &x, n);
    for (p, q) in l.iter().zip(&dd) {
        assert!((p - q).abs() < 1e-5);
    }
}

/// Changing a weight through `param_mut` drops DoRA's cached inference scale: the next
/// forward is the forward of a fresh adapter with the new weights, to the bit.
#[test]
fn a_changed_weight_never_meets_a_stale_scale() {
    let (base, mut a, x, n) = setup(AdapterKind::Dora, 0.0);
    let before = a.forward(&base, &x, n); // fills the cache
    for which in [
        AdapterParam::LoraA,
        AdapterParam::LoraB,
        AdapterParam::Magnitude,
    ] {
        a.param_mut(which).expect("DoRA has it")[1] += 0.25;
        let opts = dora_options_like(&a);
        let fresh = LoraAdapter::from_weights(
            &base,
            &opts,
            AdapterWeights {
                lora_a: a.lora_a().to_vec(),
                lora_b: a.lora_b().to_vec(),
                magnitude: a.magnitude().map(<[f32]>::to_vec),
            },
        );
        assert_eq!(
            a.forward(&base, &x, n),
            fresh.forward(&base, &x, n),
            "{which:?}"
        );
    }
    assert_ne!(before, a.forward(&base, &x, n));
}

/// PEFT-form DoRA with dropout on a base computing in bf16 — the dropped-element passes where
/// this CPU runs them, a second dense product elsewhere — against the same layer computing in
/// f32 on the same bf16 values (dense) or codes (4-bit): output, input gradient and adapter
/// gradients within 1 % of their largest element (bf16 rounds the products' operands to 2⁻⁹;
/// a dropped element taken as kept, or the reverse, moves an element by ~10 % here).
#[test]
fn peft_form_in_bf16_follows_f32() {
    let (out, inp, r, n) = (40, 64, 4, 16);
    let mut rng = Rng::new(21);
    let round = |v: f32| ops::bf16::from_bits(ops::bf16::to_bits(v));
    let w: Vec<f32> = (0..out * inp).map(|_| round(rng.normal() * 0.5)).collect();
    let x: Vec<f32> = (0..n * inp).map(|_| round(rng.normal())).collect();
    let dy: Vec<f32> = (0..n * out).map(|_| round(rng.normal())).collect();
    for quantized in [false, true] {
        let f32_base = if quantized {
            let q = crate::quant::QuantizedWeight::quantize(
                &w,
                &[out, inp],
                crate::quant::Dtype::Bf16,
                crate::quant::QuantizeOptions::default(),
            );
            BaseWeight::Quant(q.expect("40×64 quantizes"))
        } else {
            BaseWeight::Dense {
                w: w.clone(),
                out,
                inp,
            }
        };
        let mut bf16_base = f32_base.clone();
        bf16_base.set_compute_dtype(ops::bf16::ComputeDtype::Bf16);
        if !bf16_base.takes_dropped_passes() {
            println!("dropped-element passes not run on this CPU: bf16 takes a second product");
        }
        let opts = AdapterOptions {
            kind: AdapterKind::Dora,
            r,
            scaling: 1.5,
            dropout: 0.3,
            dora_dropout: DoraDropout::Peft,
        };
        let mut a = LoraAdapter::new(&f32_base, &opts, InitLoraWeights::Random, &mut rng);
        if let Some(m) = a.param_mut(AdapterParam::Magnitude) {
            for (i, v) in m.iter_mut().enumerate() {
                *v *= 1.0 + 0.02 * i as f32;
            }
        }
        let run = |base: &BaseWeight| {
            let (y, saved) = a.forward_train(base, &x, n, &mut Rng::new(9));
            let (dx, g) = a.backward(saved, base, &x, &dy, n);
            let dm = g.d_lora_magnitude_vector.expect("DoRA has a magnitude");
            [y, dx, g.d_lora_a, g.d_lora_b, dm]
        };
        let (want, got) = (run(&f32_base), run(&bf16_base));
        for (name, (w, g)) in ["y", "dx", "dA", "dB", "dm"]
            .iter()
            .zip(want.iter().zip(&got))
        {
            let scale = w.iter().fold(0f32, |m, v| m.max(v.abs()));
            let err = w.iter().zip(g).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                err <= 0.01 * scale,
                "{name} (4-bit {quantized}): off by {err:e} at scale {scale}"
            );
        }
    }
}
