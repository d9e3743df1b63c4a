//! The binary on fixtures: quantize, logits, generate, eval, merge (expected vs got printed on
//! failure).

use std::path::{Path, PathBuf};

use qdora::io::{Checkpoint, OwnedTensor};

mod common;
use common::{ids, max_diff, qdora, small_token_data};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn quantize_reproduces_the_transformers_nf4_checkpoint() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("nf4");
    let (ok, _, err) = qdora(&[
        "quantize",
        "--model",
        s(&root().join("tests/fixtures/models/tiny-llama")),
        "--out",
        s(&out),
    ]);
    assert!(ok, "{err}");
    let ours = Checkpoint::open(&out).unwrap();
    let want = Checkpoint::open(&root().join("tests/fixtures/models/tiny-llama-bnb-nf4")).unwrap();
    for k in want.keys() {
        assert!(
            ours.get(k).unwrap().data == want.get(k).unwrap().data,
            "{k}"
        );
    }
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    let want_cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            root().join("tests/fixtures/models/tiny-llama-bnb-nf4/config.json"),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["quantization_config"], want_cfg["quantization_config"]);
    // Refuses to overwrite without --overwrite, and never writes into the input.
    let (ok, _, err) = qdora(&[
        "quantize",
        "--model",
        s(&root().join("tests/fixtures/models/tiny-llama")),
        "--out",
        s(&out),
    ]);
    assert!(!ok && err.contains("not empty"), "{err}");
}

#[test]
fn logits_command_matches_the_peft_reference() {
    let d = tempfile::tempdir().unwrap();
    let case = root().join("tests/fixtures/peft/qdora");
    let r = Checkpoint::open(&case.join("reference.safetensors")).unwrap();
    let ids = r.get("input_ids").unwrap();
    let inp = d.path().join("in.safetensors");
    qdora::io::write_safetensors(
        &inp,
        &[
            OwnedTensor {
                name: "input_ids".into(),
                dtype: ids.dtype,
                shape: ids.shape.clone(),
                data: ids.data.to_vec(),
            },
            OwnedTensor {
                name: "labels".into(),
                dtype: ids.dtype,
                shape: ids.shape.clone(),
                data: ids.data.to_vec(),
            },
        ],
        &qdora::io::pt_metadata(),
    )
    .unwrap();
    let out = d.path().join("out.safetensors");
    let (ok, _, err) = qdora(&[
        "logits",
        "--model",
        s(&root().join("tests/fixtures/models/tiny-llama-bnb-nf4")),
        "--adapter",
        s(&case),
        "--input",
        s(&inp),
        "--out",
        s(&out),
    ]);
    assert!(ok, "{err}");
    let got = Checkpoint::open(&out).unwrap();
    let a = got.get("logits").unwrap().to_f32().unwrap();
    let b = r.get("logits").unwrap().to_f32().unwrap();
    let diff = max_diff(&a, &b);
    assert!(diff < 1e-4, "logits diff {diff}");
    let loss = got.get("loss").unwrap().to_f32().unwrap()[0];
    let want = r.get("loss").unwrap().to_f32().unwrap()[0];
    assert!((loss - want).abs() < 1e-5, "loss {loss} vs {want}");
}

#[test]
fn generate_reproduces_the_stories260k_golden_text() {
    let v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("models/stories260K/verification.json")).unwrap(),
    )
    .unwrap();
    let golden = v.to_string();
    let (ok, out, err) = qdora(&[
        "generate",
        "--prompt",
        "Once upon a time",
        "--max-new-tokens",
        "195",
    ]);
    assert!(ok, "{err}");
    let text = out.trim_end();
    let expected = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One day, she saw a big, red ball.";
    assert!(text.starts_with(expected), "got:\n{text}");
    let escaped = serde_json::to_string(text).unwrap();
    assert!(
        golden.contains(escaped.trim_matches('"')),
        "generation is not the golden text in verification.json:\n{text}"
    );
}

#[test]
fn merge_command_writes_a_model_with_the_merged_logits() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("merged");
    let case = root().join("tests/fixtures/peft/dora");
    let (ok, _, err) = qdora(&[
        "merge",
        "--model",
        s(&root().join("tests/fixtures/models/tiny-llama")),
        "--adapter",
        s(&case),
        "--out",
        s(&out),
    ]);
    assert!(ok, "{err}");
    let r = Checkpoint::open(&case.join("reference.safetensors")).unwrap();
    let (ids, b, t) = ids(&r, "input_ids");
    let mut m = qdora::model::load(&out, &Default::default()).unwrap();
    let logits = m.logits(&ids, b, t).unwrap();
    let want = r.get("logits_merged").unwrap().to_f32().unwrap();
    let diff = max_diff(&logits, &want);
    assert!(diff < 1e-4, "merged logits diff {diff}");
    // --requantize writes a bitsandbytes checkpoint that loads 4-bit.
    let out4 = d.path().join("merged4");
    let (ok, _, err) = qdora(&[
        "merge",
        "--model",
        s(&root().join("tests/fixtures/models/tiny-llama")),
        "--adapter",
        s(&case),
        "--out",
        s(&out4),
        "--requantize",
    ]);
    assert!(ok, "{err}");
    let m4 = qdora::model::load(&out4, &Default::default()).unwrap();
    assert!(m4.layers[0]
        .linear(qdora::model::Proj::QProj)
        .weight
        .is_quantized());
}

#[test]
fn eval_reports_loss_and_perplexity() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("t.txt");
    std::fs::write(&data, "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. ".repeat(20)).unwrap();
    let (ok, out, err) = qdora(&["eval", "--data", s(&data), "--seq-len", "64"]);
    assert!(ok, "{err}");
    // "<n> sequences, <m> tokens: loss <x>, perplexity <y>", the numbers the library gives
    let words: Vec<&str> = out
        .split([' ', ',', ':', '\n'])
        .filter(|w| !w.is_empty())
        .collect();
    let after = |w: &str| -> f64 {
        let i = words
            .iter()
            .position(|x| *x == w)
            .unwrap_or_else(|| panic!("{w} in {out}"));
        words[i + 1]
            .parse()
            .unwrap_or_else(|_| panic!("a number after {w} in {out}"))
    };
    let before = |w: &str| -> f64 {
        let i = words
            .iter()
            .position(|x| *x == w)
            .unwrap_or_else(|| panic!("{w} in {out}"));
        words[i - 1]
            .parse()
            .unwrap_or_else(|_| panic!("a number before {w} in {out}"))
    };
    let model_dir = qdora::embedded::stories260k().unwrap();
    let mut model = qdora::model::load(&model_dir, &Default::default()).unwrap();
    let tok = qdora::model::tokenizer::Tokenizer::load(&model_dir).unwrap();
    let opts = qdora::train::data::DataOptions {
        seq_len: 64,
        packing: true,
        train_on_prompt: false,
        skip_bad_records: false,
    };
    let ds = qdora::train::data::load(&data, Some(&tok), &opts).unwrap();
    model.ensure_positions(64);
    let (sum, count) =
        qdora::train::evaluate_with(&mut model, &ds.sequences, 4, &mut |_| {}).unwrap();
    let loss = sum / count as f64;
    assert_eq!(before("sequences"), ds.sequences.len() as f64, "{out}");
    assert_eq!(before("tokens"), count as f64, "{out}");
    assert!((after("loss") - loss).abs() < 1e-4, "{out}: loss {loss}");
    assert!(
        (after("perplexity") - loss.exp()).abs() < 1e-3 * loss.exp(),
        "{out}"
    );
    let (ok, _, err) = qdora(&["eval", "--model", "/nonexistent/model", "--data", s(&data)]);
    assert!(!ok && err.contains("/nonexistent/model"), "{err}");
}

#[test]
fn merging_a_qdora_adapter_uses_the_nf4_base_it_was_trained_on() {
    let d = tempfile::tempdir().unwrap();
    let data = small_token_data(d.path());
    let base = root().join("tests/fixtures/models/tiny-llama");
    let adapter = d.path().join("qdora");
    let (ok, _, err) = qdora(&[
        "train",
        "--model",
        s(&base),
        "--data",
        s(&data),
        "--out",
        s(&adapter),
        "--mode",
        "qdora",
        "--max-steps",
        "3",
        "--batch-size",
        "2",
        "--seq-len",
        "32",
        "--lr",
        "0.05",
    ]);
    assert!(ok, "{err}");
    let merged = d.path().join("merged");
    let (ok, _, err) = qdora(&[
        "merge",
        "--model",
        s(&base),
        "--adapter",
        s(&adapter),
        "--out",
        s(&merged),
    ]);
    assert!(ok, "{err}");
    let ids: Vec<u32> = (0..24).map(|i| (i * 13 % 256) as u32).collect();
    // Unmerged: the NF4 base quantized on load (as in training) plus the adapter.
    let cfg = qdora::train::TrainConfig {
        mode: qdora::train::Mode::Qdora,
        ..Default::default()
    };
    let storage = qdora::model::BaseStorage::Quantize(cfg.quantize_options());
    let mut m = qdora::model::load(
        &base,
        &qdora::model::LoadOptions {
            storage,
            ..Default::default()
        },
    )
    .unwrap();
    qdora::model::adapters::load_adapter(&mut m, &adapter).unwrap();
    let want = m.logits(&ids, 2, 12).unwrap();
    let got = qdora::model::load(&merged, &Default::default())
        .unwrap()
        .logits(&ids, 2, 12)
        .unwrap();
    let diff = max_diff(&got, &want);
    assert!(diff < 1e-4, "merged vs unmerged logits differ by {diff}");
}

/// `bench train` prints one JSON line with issue 6's fields, and its figures agree with each
/// other: the ceiling is the higher of its two readings and MFU is achieved over ceiling.
#[test]
fn bench_train_prints_consistent_figures() {
    let (ok, out, err) = qdora(&[
        "bench",
        "train",
        "--mode",
        "qdora",
        "--batch-size",
        "2",
        "--seq-len",
        "32",
        "--steps",
        "2",
        "--gradient-checkpointing",
    ]);
    assert!(ok, "{err}");
    let line: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON line");
    let f = |k: &str| line[k].as_f64().unwrap_or_else(|| panic!("{k} in {line}"));
    for k in [
        "params_matmul",
        "step_s",
        "tokens_per_s",
        "gflops",
        "ceiling_gflops",
        "mfu",
        "peak_rss_mib",
    ] {
        assert!(f(k) > 0.0, "{k} in {line}");
    }
    assert_eq!(line["mode"], "qdora");
    assert_eq!(line["gradient_checkpointing"], true);
    assert_eq!(f("tokens_per_step"), 64.0);
    let readings = line["ceiling_readings"].as_array().expect("two readings");
    let r: Vec<f64> = readings.iter().filter_map(|v| v.as_f64()).collect();
    assert_eq!(r.len(), 2, "{line}");
    assert_eq!(f("ceiling_gflops"), r[0].max(r[1]));
    assert!((f("mfu") - f("gflops") / f("ceiling_gflops")).abs() < 1e-12);
    assert!((f("tokens_per_s") - 64.0 / f("step_s")).abs() < 1e-6 * f("tokens_per_s"));
    assert!(f("loss").is_finite());
    assert_eq!(line["compute_dtype"], "f32");
    assert_eq!(line["kernels"], "gemm f32");
    // in bf16 the ceiling is the bf16 kernel set's, and the line says which set ran
    let (ok, out, err) = qdora(&[
        "bench",
        "train",
        "--batch-size",
        "2",
        "--seq-len",
        "32",
        "--steps",
        "1",
        "--compute-dtype",
        "bf16",
    ]);
    assert!(ok, "{err}");
    let line: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON line");
    assert_eq!(line["compute_dtype"], "bf16");
    let kernels = line["kernels"].as_str().unwrap_or_default();
    assert!(kernels.starts_with("bf16 "), "{line}");
    assert!(line["mfu"].as_f64().is_some_and(|m| m > 0.0), "{line}");
    let (ok, _, err) = qdora(&["bench", "train", "--preset", "stories260K"]);
    assert!(!ok);
    assert!(
        err.contains("unknown --preset \"stories260K\"") && err.contains("llama-small-1024"),
        "{err}"
    );
}

/// `bench generate` prints one line per base asked for, with the weight bandwidth consistent
/// with the decode speed; an unknown `--weights` is an error naming the choices.
#[test]
fn bench_generate_prints_one_line_per_base() {
    let (ok, out, err) = qdora(&["bench", "generate", "--weights", "nf4", "--seq-len", "8"]);
    assert!(ok, "{err}");
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(lines.len(), 1, "{out}");
    let line = &lines[0];
    let f = |k: &str| line[k].as_f64().unwrap_or_else(|| panic!("{k} in {line}"));
    assert_eq!(line["weights"], "nf4");
    assert_eq!(f("prefill_tokens"), 8.0);
    assert_eq!(f("decode_tokens"), 64.0);
    let want = f("weight_mib") * 1024.0 * 1024.0 * f("decode_tokens_per_s") / 1e9;
    assert!(f("weight_mib") > 0.0, "{line}");
    assert!(
        (f("decode_weight_gb_per_s") - want).abs() < 1e-9 * want,
        "{line}"
    );
    let (ok, _, err) = qdora(&["bench", "generate", "--weights", "int8"]);
    assert!(!ok);
    assert!(
        err.contains("invalid value 'int8'") && err.contains("[possible values: both, f32, nf4]"),
        "{err}"
    );
}

#[test]
fn export_writes_a_gguf_and_refuses_what_llama_cpp_cannot_hold() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("s.gguf");
    let (ok, stdout, err) = qdora(&["export", "--out", s(&out), "--type", "q8_0"]);
    assert!(ok, "{err}");
    assert!(stdout.contains("47 tensors"), "{stdout}");
    let f = qdora::gguf::GgufFile::open(&out).unwrap();
    assert_eq!(
        f.get("general.architecture"),
        Some(&qdora::gguf::Value::Str("llama".into()))
    );
    assert_eq!(
        f.get("general.file_type"),
        Some(&qdora::gguf::Value::U32(7))
    );
    // an existing file is kept without --overwrite
    let (ok, _, err) = qdora(&["export", "--out", s(&out)]);
    assert!(!ok && err.contains("--overwrite"), "{err}");
    let (ok, _, err) = qdora(&[
        "export",
        "--adapter-only",
        "--out",
        s(&dir.path().join("a.gguf")),
    ]);
    assert!(!ok && err.contains("needs --adapter"), "{err}");
    let fx = root().join("tests/fixtures");
    let (ok, _, err) = qdora(&[
        "export",
        "--model",
        s(&fx.join("models/tiny-llama")),
        "--adapter",
        s(&fx.join("peft/dora")),
        "--adapter-only",
        "--out",
        s(&dir.path().join("d.gguf")),
    ]);
    assert!(!ok && err.contains("magnitude vector"), "{err}");
    assert!(!dir.path().join("d.gguf").exists());
}
