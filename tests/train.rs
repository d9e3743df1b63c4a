//! Training engine: every mode trains and gives every trainable tensor a gradient, full
//! fine-tuning's gradients match finite differences, checkpointing changes nothing, resume after
//! SIGKILL reproduces the uninterrupted loss curve, NaN stops with the step named, bad records
//! are reported with file and line.

use std::path::{Path, PathBuf};
use std::process::Command;

use qdora::adapter::DoraDropout;
use qdora::adapter::InitLoraWeights;
use qdora::model::Proj;
use qdora::model::StepOptions;
use qdora::ops::bf16::ComputeDtype;
use qdora::ops::Rng;
use qdora::train::{build_model, Mode, TrainConfig};

fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/tiny-llama")
}

/// A pre-tokenized JSONL dataset with a learnable pattern (counting sequences mod 256).
fn write_data(dir: &Path, records: usize, len: usize) -> PathBuf {
    let p = dir.join("data.jsonl");
    let mut s = String::new();
    for r in 0..records {
        let ids: Vec<String> = (0..len)
            .map(|i| ((r * 7 + i * 3) % 256).to_string())
            .collect();
        s.push_str(&format!("{{\"input_ids\": [{}]}}\n", ids.join(", ")));
    }
    std::fs::write(&p, s).unwrap();
    p
}

fn batch(b: usize, t: usize) -> (Vec<u32>, Vec<i64>) {
    let ids: Vec<u32> = (0..b * t).map(|i| ((i * 5 + 3) % 256) as u32).collect();
    let labels = ids.iter().map(|&x| x as i64).collect();
    (ids, labels)
}

#[test]
fn every_mode_gives_every_trainable_tensor_a_gradient() {
    for mode in Mode::ALL {
        let cfg = TrainConfig {
            mode,
            init_lora_weights: InitLoraWeights::Random,
            lora_dropout: 0.1,
            ..Default::default()
        };
        let (mut m, _) = build_model(&tiny(), &cfg).unwrap();
        let (ids, labels) = batch(2, 16);
        let opts = StepOptions {
            gradient_checkpointing: false,
            grad_scale: 1.0 / 30.0,
        };
        let (_, _, grads) = m
            .forward_backward(&ids, &labels, 2, 16, &opts, &mut Rng::new(1))
            .unwrap();
        let mut names: Vec<String> = m.trainable().iter().map(|id| id.key()).collect();
        let mut got: Vec<String> = grads.iter().map(|g| g.0.key()).collect();
        names.sort();
        got.sort();
        assert_eq!(names, got, "{mode:?}: one gradient per trainable tensor");
        for (id, g) in &grads {
            let n = id.key();
            assert_eq!(g.len(), m.param(*id).len(), "{mode:?}: {n} gradient shape");
            assert!(
                g.iter().any(|v| *v != 0.0),
                "{mode:?}: {n} has an all-zero gradient"
            );
            assert!(g.iter().all(|v| v.is_finite()), "{mode:?}: {n} not finite");
        }
        if mode == Mode::Full {
            assert!(names.iter().any(|n| n == "model.embed_tokens.weight"));
            assert!(names.iter().any(|n| n == "lm_head.weight"));
        }
        if mode.quantized() {
            assert!(m.layers[0].linear(Proj::QProj).weight.is_quantized());
        }
    }
}

#[test]
fn gradient_checkpointing_changes_nothing() {
    // Recomputation skips down_proj's product where backward does not need it (LoRA, full) and
    // redraws the dropout masks from their seeds: gradients must stay bit-identical.
    // In bf16 the recomputed block keeps its activations in bf16 as the forward did.
    for (mode, dora_dropout, compute_dtype) in [
        (Mode::Qdora, DoraDropout::Peft, ComputeDtype::F32),
        (Mode::Qdora, DoraDropout::LoraOnly, ComputeDtype::F32),
        (Mode::Qlora, DoraDropout::Peft, ComputeDtype::F32),
        (Mode::Full, DoraDropout::Peft, ComputeDtype::F32),
        (Mode::Qdora, DoraDropout::Peft, ComputeDtype::Bf16),
        (Mode::Qdora, DoraDropout::LoraOnly, ComputeDtype::Bf16),
        (Mode::Dora, DoraDropout::Peft, ComputeDtype::Bf16),
        (Mode::Lora, DoraDropout::Peft, ComputeDtype::Bf16),
    ] {
        let cfg = TrainConfig {
            mode,
            compute_dtype,
            lora_dropout: 0.2,
            dora_dropout,
            init_lora_weights: InitLoraWeights::Random,
            ..Default::default()
        };
        let (mut m, _) = build_model(&tiny(), &cfg).unwrap();
        let (ids, labels) = batch(2, 12);
        let run = |m: &mut qdora::model::Llama, ck: bool| {
            let opts = StepOptions {
                gradient_checkpointing: ck,
                grad_scale: 0.1,
            };
            m.forward_backward(&ids, &labels, 2, 12, &opts, &mut Rng::new(5))
                .unwrap()
        };
        let (l1, _, g1) = run(&mut m, false);
        let (l2, _, g2) = run(&mut m, true);
        assert_eq!(l1, l2);
        for ((n1, a), (_, b)) in g1.iter().zip(&g2) {
            assert_eq!(a, b, "{mode:?} {dora_dropout:?} {compute_dtype:?}: {n1}");
        }
    }
}

#[test]
fn dora_dropout_placement_is_a_setting() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_data(dir.path(), 8, 40);
    let out = dir.path().join("run");
    let st = train_cmd(&tiny(), &data, &out, 2)
        .args(["--dora-dropout", "lora-only"])
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let cfg = std::fs::read_to_string(out.join("train_config.toml")).unwrap();
    assert!(cfg.contains("dora_dropout = \"lora-only\""), "{cfg}");
    let bad = train_cmd(&tiny(), &data, &dir.path().join("bad"), 2)
        .args(["--dora-dropout", "sometimes"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("invalid value 'sometimes'")
            && err.contains("[possible values: peft, lora-only]"),
        "{err}"
    );
}

#[test]
fn full_finetune_gradients_match_finite_differences() {
    let cfg = TrainConfig {
        mode: Mode::Full,
        ..Default::default()
    };
    let (mut m, _) = build_model(&tiny(), &cfg).unwrap();
    let (b, t) = (2, 8);
    let (ids, labels) = batch(b, t);
    let opts = StepOptions {
        gradient_checkpointing: false,
        grad_scale: 1.0,
    };
    let (_, _, grads) = m
        .forward_backward(&ids, &labels, b, t, &opts, &mut Rng::new(0))
        .unwrap();
    let loss_of = |m: &mut qdora::model::Llama| -> f64 { m.loss(&ids, &labels, b, t).unwrap().0 };
    let mut checked = 0;
    for (id, g) in &grads {
        let (id, name) = (*id, id.key());
        // Probe the element with the largest gradient of each tensor.
        let (i, &gi) = g
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
            .unwrap();
        let h = 1e-2f32;
        let bump = |m: &mut qdora::model::Llama, d: f32| m.param_mut(id)[i] += d;
        bump(&mut m, h);
        let lp = loss_of(&mut m);
        bump(&mut m, -2.0 * h);
        let lm = loss_of(&mut m);
        bump(&mut m, h);
        let num = (lp - lm) / (2.0 * h as f64);
        assert!(
            (num - gi as f64).abs() <= 2e-2 * (num.abs() + 1e-2),
            "{name}[{i}]: numeric {num} analytic {gi}"
        );
        checked += 1;
    }
    assert!(checked >= 2 * 9 + 3, "checked {checked} tensors");
}

fn qdora_bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_qdora"))
}

fn train_cmd(model: &Path, data: &Path, out: &Path, steps: usize) -> Command {
    train_cmd_lr(model, data, out, steps, "1e-2")
}

fn train_cmd_lr(model: &Path, data: &Path, out: &Path, steps: usize, lr: &str) -> Command {
    let mut c = qdora_bin();
    c.args([
        "train",
        "--mode",
        "qdora",
        "--batch-size",
        "2",
        "--seq-len",
        "32",
        "--seed",
        "3",
        "--lora-dropout",
        "0.1",
    ])
    .arg(format!("--lr={lr}"))
    .arg("--max-steps")
    .arg(steps.to_string())
    .arg("--model")
    .arg(model)
    .arg("--data")
    .arg(data)
    .arg("--out")
    .arg(out);
    c
}

fn losses(out: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            Some((v["step"].as_u64()?, v["loss"].as_f64()?))
        })
        .collect()
}

#[test]
fn resume_after_sigkill_reproduces_the_loss_curve() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_data(dir.path(), 40, 64);
    let steps = 80;
    let full = dir.path().join("full");
    let st = train_cmd(&tiny(), &data, &full, steps).status().unwrap();
    assert!(st.success());
    let want = losses(&full);
    assert_eq!(want.len(), steps);
    assert!(
        want.last().unwrap().1 < want[0].1,
        "loss fell: {:?}",
        (want[0], want.last())
    );

    let out = dir.path().join("killed");
    let mut child = train_cmd(&tiny(), &data, &out, steps)
        .args(["--save-every", "5"])
        .spawn()
        .unwrap();
    // Wait for a checkpoint, then kill hard (possibly in the middle of writing the next one).
    let t0 = std::time::Instant::now();
    while !out.join("checkpoint-10").join("state.json").exists() {
        assert!(t0.elapsed().as_secs() < 120, "no checkpoint appeared");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap();
    let _ = child.wait();
    assert!(
        !out.join("adapter_model.safetensors").exists(),
        "the run was killed before it finished"
    );
    let last = qdora::train::checkpoint::latest(&out).unwrap();
    assert!(last.join("trainable.safetensors").exists());
    let st = train_cmd(&tiny(), &data, &out, steps)
        .args(["--save-every", "5", "--resume"])
        .status()
        .unwrap();
    assert!(st.success());
    let got = losses(&out);
    assert_eq!(
        got.len(),
        want.len(),
        "resumed metrics cover every step once"
    );
    for ((s1, a), (s2, b)) in got.iter().zip(&want) {
        assert_eq!(s1, s2);
        assert!(
            (a - b).abs() <= 1e-9 * b.abs().max(1.0),
            "step {s1}: resumed {a} vs uninterrupted {b}"
        );
    }
}

#[test]
fn non_finite_loss_stops_with_the_step_and_keeps_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_data(dir.path(), 20, 64);
    let out = dir.path().join("nan");
    let o = train_cmd_lr(&tiny(), &data, &out, 30, "1e30")
        .args(["--max-grad-norm", "0", "--save-every", "1"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("step ") && (err.contains("NaN") || err.contains("inf")),
        "{err}"
    );
    assert!(err.contains("last good checkpoint"), "{err}");
    assert!(qdora::train::checkpoint::latest(&out).is_some());
}

#[test]
fn bad_records_name_file_and_line_or_are_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_data(dir.path(), 20, 64);
    let mut text = std::fs::read_to_string(&data).unwrap();
    text.push_str("{\"input_ids\": [1, 2,\n");
    text.push_str("{\"text_typo\": \"x\"}\n");
    std::fs::write(&data, text).unwrap();
    let out = dir.path().join("bad");
    let o = train_cmd(&tiny(), &data, &out, 2).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("data.jsonl:21:"), "{err}");
    let o = train_cmd(&tiny(), &data, &out, 2)
        .arg("--skip-bad-records")
        .arg("--overwrite")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("skipped") && err.contains(":21:") && err.contains(":22:"),
        "{err}"
    );
}

#[test]
fn invalid_settings_are_all_reported() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_data(dir.path(), 4, 64);
    let o = train_cmd_lr(&tiny(), &data, &dir.path().join("x"), 2, "-1")
        .args(["--batch-size", "0", "--seq-len", "1"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        err.contains("lr:") && err.contains("batch_size:") && err.contains("seq_len:"),
        "{err}"
    );
    let o = train_cmd(&tiny(), &data, &dir.path().join("y"), 2)
        .args(["--batch-size", "64"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("sequences per step"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = train_cmd(&tiny(), &data, &tiny(), 2).output().unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("input model folder"));
}

#[test]
fn ctrl_c_saves_a_checkpoint_and_resume_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_data(dir.path(), 40, 64);
    let out = dir.path().join("int");
    let mut child = train_cmd(&tiny(), &data, &out, 100_000).spawn().unwrap();
    let t0 = std::time::Instant::now();
    while !out.join("metrics.jsonl").exists() || losses(&out).len() < 3 {
        assert!(t0.elapsed().as_secs() < 120, "training did not start");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let st = child.wait().unwrap();
    assert_eq!(st.code(), Some(130), "interrupted runs exit with 130");
    let ck = qdora::train::checkpoint::latest(&out).expect("a checkpoint was saved on Ctrl-C");
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ck.join("state.json")).unwrap()).unwrap();
    let step = state["step"].as_u64().unwrap() as usize;
    assert!(step >= 3);
    let st = train_cmd(&tiny(), &data, &out, step + 5)
        .arg("--resume")
        .status()
        .unwrap();
    assert!(st.success());
    assert!(out.join("adapter_model.safetensors").exists());
}

#[test]
fn a_half_written_checkpoint_is_ignored_on_resume() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_data(dir.path(), 40, 64);
    let out = dir.path().join("half");
    let st = train_cmd(&tiny(), &data, &out, 10)
        .args(["--save-every", "5"])
        .status()
        .unwrap();
    assert!(st.success());
    // What a crash in the middle of writing checkpoint-9 leaves: a staged folder, no rename.
    let staged = out.join("checkpoint-9.tmp-4242");
    std::fs::create_dir_all(&staged).unwrap();
    std::fs::write(staged.join("trainable.safetensors"), b"\x10\x00\x00").unwrap();
    let latest = qdora::train::checkpoint::latest(&out).unwrap();
    assert!(latest.ends_with("checkpoint-5"), "{}", latest.display());
    let st = train_cmd(&tiny(), &data, &out, 10)
        .args(["--save-every", "5", "--resume"])
        .status()
        .unwrap();
    assert!(st.success());
}
