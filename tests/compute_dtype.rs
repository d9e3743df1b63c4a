//! bf16 compute (`compute_dtype = "bf16"`): the frozen weights' products take bf16 operands with
//! f32 sums, everything trained stays f32. Checked against the same model in f32 on the tiny
//! Llama fixture, in every mode, and through the binary (the choice is written to
//! `train_config.toml` and `summary.json`, and `auto` follows the CPU).
//!
//! Tolerances: a bf16 operand carries a relative error up to 2⁻⁹, and the errors of every
//! product feed the softmax and the whole backward. Measured on this fixture (random LoRA
//! factors, 2 × 24 tokens): the mean loss moves by ≤ 1.2·10⁻⁴ of itself, each adapter gradient
//! by 2–5 % of its norm (the same spread in every tensor, as rounding noise; a wrong product
//! would be off by its whole norm). Asserted: loss 1 %, gradients 10 %. Per-product bounds
//! are tested where they are tight (`ops::bf16`, `adapter::base`). Full fine-tuning trains every
//! weight and therefore keeps f32 compute: its gradients are the f32 ones, to the bit.

use std::path::{Path, PathBuf};

use qdora::adapter::InitLoraWeights;
use qdora::model::StepOptions;
use qdora::ops::bf16::{Bf16Kernel, ComputeDtype};
use qdora::ops::Rng;
use qdora::train::{build_model, Mode, TrainConfig};

mod common;
use common::{qdora, small_token_data};

fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/tiny-llama")
}

fn norm(v: &[f32]) -> f64 {
    v.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt()
}

/// Loss and gradients of one batch of 2 × 24 (48 rows: past the 4-bit decoding route).
fn loss_and_grads(
    mode: Mode,
    compute: ComputeDtype,
) -> (f64, Vec<(String, Vec<f32>)>, ComputeDtype) {
    let cfg = TrainConfig {
        mode,
        init_lora_weights: InitLoraWeights::Random,
        lora_dropout: 0.0,
        compute_dtype: compute,
        ..Default::default()
    };
    let (mut m, _) = build_model(&tiny(), &cfg).unwrap();
    let ids: Vec<u32> = (0..48).map(|i| ((i * 11 + 5) % 256) as u32).collect();
    let labels: Vec<i64> = ids.iter().map(|&x| x as i64).collect();
    let opts = StepOptions {
        gradient_checkpointing: false,
        grad_scale: 1.0 / 48.0,
    };
    let (loss, count, grads) = m
        .forward_backward(&ids, &labels, 2, 24, &opts, &mut Rng::new(3))
        .unwrap();
    let grads = grads.into_iter().map(|(id, g)| (id.key(), g)).collect();
    (loss / count as f64, grads, m.compute_dtype())
}

#[test]
fn bf16_compute_follows_f32_in_every_mode() {
    for mode in Mode::ALL {
        let (l32, g32, c32) = loss_and_grads(mode, ComputeDtype::F32);
        let (l16, g16, c16) = loss_and_grads(mode, ComputeDtype::Bf16);
        assert_eq!(c32, ComputeDtype::F32);
        let want = if mode == Mode::Full {
            ComputeDtype::F32
        } else {
            ComputeDtype::Bf16
        };
        assert_eq!(c16, want, "{mode:?}");
        let rel = (l16 - l32).abs() / l32;
        println!("{mode:?}: loss {l32:.6} (f32) vs {l16:.6} (bf16), rel {rel:.2e}");
        assert!(rel < 1e-2, "{mode:?}: loss {l16} vs {l32}");
        assert_eq!(g32.len(), g16.len());
        let mut worst = 0f64;
        for ((k32, a), (k16, b)) in g32.iter().zip(&g16) {
            assert_eq!(k32, k16);
            let d: Vec<f32> = a.iter().zip(b).map(|(x, y)| x - y).collect();
            let r = norm(&d) / norm(a).max(1e-30);
            worst = worst.max(r);
            if mode == Mode::Full {
                assert_eq!(a, b, "{k32}: full fine-tuning computes in f32");
            } else {
                assert!(
                    r < 0.1,
                    "{mode:?} {k32}: gradient off by {r:.3e} of its norm"
                );
            }
        }
        println!("{mode:?}: worst gradient difference {worst:.2e} of the norm");
    }
}

/// The compute dtype is set before the adapters are attached, so a fresh DoRA's magnitude is
/// the norm of the bf16 weight it divides by: the adapted model starts exactly at the base.
#[test]
fn fresh_dora_on_a_bf16_base_leaves_the_logits_unchanged() {
    for mode in [Mode::Dora, Mode::Qdora] {
        let cfg = TrainConfig {
            mode,
            compute_dtype: ComputeDtype::Bf16,
            ..Default::default()
        };
        let (mut adapted, _) = build_model(&tiny(), &cfg).unwrap();
        let full_cfg = TrainConfig {
            mode: if mode.quantized() {
                Mode::Qlora
            } else {
                Mode::Lora
            },
            ..cfg.clone()
        };
        let (mut lora, _) = build_model(&tiny(), &full_cfg).unwrap();
        let ids: Vec<u32> = (0..40).map(|i| ((i * 7 + 1) % 256) as u32).collect();
        let a = adapted.logits(&ids, 2, 20).unwrap();
        let b = lora.logits(&ids, 2, 20).unwrap();
        let d = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(d < 1e-5, "{mode:?}: fresh DoRA moved the logits by {d}");
    }
}

#[test]
fn auto_follows_the_cpu() {
    let (_, _, c) = loss_and_grads(Mode::Qdora, ComputeDtype::Auto);
    let native = Bf16Kernel::native_available();
    println!("AVX512_BF16 here: {native}; auto ran as {}", c.name());
    assert_eq!(c.is_bf16(), native);
}

/// `train --compute-dtype bf16` writes what ran into `train_config.toml` and `summary.json`;
/// `eval` of the adapter computes as it trained unless told otherwise, and the two dtypes give
/// nearly the same loss.
#[test]
fn the_binary_records_and_reuses_the_compute_dtype() {
    let d = tempfile::tempdir().unwrap();
    let data = small_token_data(d.path());
    let out = d.path().join("run");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let (ok, _, err) = qdora(&[
        "train",
        "--model",
        &s(&tiny()),
        "--data",
        &s(&data),
        "--out",
        &s(&out),
        "--max-steps",
        "2",
        "--batch-size",
        "2",
        "--seq-len",
        "32",
        "--compute-dtype",
        "bf16",
    ]);
    assert!(ok, "{err}");
    let cfg = std::fs::read_to_string(out.join("train_config.toml")).unwrap();
    assert!(cfg.contains("compute_dtype = \"bf16\""), "{cfg}");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["compute_dtype"], "bf16");
    let kernels = summary["kernels"].as_str().unwrap();
    assert!(kernels.starts_with("bf16 "), "{kernels}");
    let eval = |extra: &[&str]| {
        let mut args = vec![
            "eval".to_string(),
            "--model".into(),
            s(&tiny()),
            "--adapter".into(),
            s(&out),
            "--data".into(),
            s(&data),
            "--seq-len".into(),
            "32".into(),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (ok, stdout, err) = qdora(&args);
        assert!(ok, "{err}");
        let loss: f64 = stdout
            .split_whitespace()
            .skip_while(|w| !w.starts_with("loss"))
            .nth(1)
            .and_then(|w| {
                w.trim_matches(|c: char| !c.is_ascii_digit() && c != '.')
                    .parse()
                    .ok()
            })
            .unwrap_or_else(|| panic!("no loss in {stdout:?}"));
        loss
    };
    let (as_trained, f32_loss) = (eval(&[]), eval(&["--compute-dtype", "f32"]));
    let rel = (as_trained - f32_loss).abs() / f32_loss;
    println!("eval loss: {as_trained} as trained (bf16), {f32_loss} in f32");
    assert!(rel < 1e-2, "{as_trained} vs {f32_loss}");
    assert_ne!(as_trained, f32_loss, "the adapter's bf16 was not used");
}
