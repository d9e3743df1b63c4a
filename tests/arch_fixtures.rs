//! Tiny random Llama 3 (llama3 RoPE scaling, attention + MLP biases, tied embeddings), Llama
//! (linear RoPE scaling), Mistral (sliding window, free head_dim), Qwen2 (q/k/v biases, tied) and
//! Qwen3 (q/k norm, free head_dim) against transformers 5.24 (made by make_arch_fixtures.py),
//! and PEFT adapters with `modules_to_save` on the tied Qwen2 (make_tied_modules_to_save.py).

use std::path::Path;

use qdora::io::Checkpoint;
use qdora::model::{load, LoadOptions};

mod common;
use common::{ids, max_diff};

fn check(name: &str) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/arch")
        .join(name);
    let mut m = load(&dir, &LoadOptions::default()).unwrap();
    let r = Checkpoint::open(&dir.join("reference.safetensors")).unwrap();
    let (ids, b, s) = ids(&r, "input_ids");
    let logits = m.logits(&ids, b, s).unwrap();
    let want = r.get("logits").unwrap().to_f32().unwrap();
    let d = max_diff(&logits, &want);
    assert!(d < 1e-4, "{name}: logits max diff {d}");
    let labels = r.get("labels").unwrap().to_i64().unwrap();
    let (sum, n) = m.loss(&ids, &labels, b, s).unwrap();
    let want = r.get("loss").unwrap().to_f32().unwrap()[0];
    assert!(
        ((sum / n as f64) as f32 - want).abs() < 1e-5,
        "{name}: loss"
    );
    // KV-cached decoding agrees with full recomputation at every position.
    let mut cache = m.new_cache();
    let v = m.config.vocab_size;
    for i in 0..s {
        let last = m.forward_cached(&ids[i..i + 1], &mut cache).unwrap();
        let full = &logits[i * v..(i + 1) * v];
        let d = max_diff(&last, full);
        assert!(d < 1e-4, "{name}: cached step {i} differs by {d}");
    }
}

#[test]
fn llama3_rope_scaling_biases_and_tied_embeddings() {
    check("llama3-rope-bias-tied");
}

#[test]
fn llama_linear_rope_scaling() {
    check("llama-rope-linear");
}

#[test]
fn mistral_sliding_window() {
    check("mistral-sliding-window");
}

#[test]
fn qwen2_qkv_bias() {
    check("qwen2-qkv-bias");
}

#[test]
fn qwen3_qk_norm() {
    check("qwen3-qk-norm");
}

#[test]
fn sharded_checkpoint_loads_like_the_single_file() {
    use qdora::io::OwnedTensor;
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/tiny-llama");
    let d = tempfile::tempdir().unwrap();
    std::fs::copy(src.join("config.json"), d.path().join("config.json")).unwrap();
    let ck = Checkpoint::open(&src).unwrap();
    let keys: Vec<String> = ck.keys().map(String::from).collect();
    let mut map = serde_json::Map::new();
    for (i, part) in keys.chunks(keys.len() / 2 + 1).enumerate() {
        let name = format!("model-0000{}-of-00002.safetensors", i + 1);
        let ts: Vec<OwnedTensor> = part
            .iter()
            .map(|k| {
                let t = ck.get(k).unwrap();
                map.insert(k.clone(), serde_json::Value::String(name.clone()));
                OwnedTensor {
                    name: k.clone(),
                    dtype: t.dtype,
                    shape: t.shape.clone(),
                    data: t.data.to_vec(),
                }
            })
            .collect();
        qdora::io::write_safetensors(&d.path().join(&name), &ts, &qdora::io::pt_metadata())
            .unwrap();
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(
        d.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let ids: Vec<u32> = (0..24).map(|i| (i * 11 % 256) as u32).collect();
    let a = load(&src, &LoadOptions::default())
        .unwrap()
        .logits(&ids, 2, 12)
        .unwrap();
    let b = load(d.path(), &LoadOptions::default())
        .unwrap()
        .logits(&ids, 2, 12)
        .unwrap();
    assert_eq!(a, b);
    // An index pointing outside the folder is refused.
    let bad = serde_json::json!({"weight_map": {"x": "../model.safetensors"}});
    std::fs::write(
        d.path().join("model.safetensors.index.json"),
        bad.to_string(),
    )
    .unwrap();
    assert!(matches!(
        Checkpoint::open(d.path()),
        Err(qdora::io::Error::Format { .. })
    ));
}

/// Attaches fresh adapters for `cfg` and moves every trainable tensor by 0.01 (a stand-in for
/// an optimizer step); returns the trainable tensors' names.
fn attach_and_nudge(m: &mut qdora::model::Llama, cfg: &qdora::adapter::LoraConfig) -> Vec<String> {
    let peft = qdora::adapter::DoraDropout::Peft;
    qdora::model::adapters::attach(m, cfg, peft, &mut qdora::ops::Rng::new(1)).unwrap();
    let mut names = Vec::new();
    for id in m.trainable() {
        m.param_mut(id).iter_mut().for_each(|v| *v += 0.01);
        names.push(id.key());
    }
    names
}

#[test]
fn lora_only_bias_and_modules_to_save_round_trip_with_peft_keys() {
    use qdora::adapter::{Bias, LoraConfig, TargetModules};
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/arch/qwen2-qkv-bias");
    let mut m = load(&dir, &LoadOptions::default()).unwrap();
    let cfg = LoraConfig {
        target_modules: Some(TargetModules::List(vec!["q_proj".into(), "o_proj".into()])),
        bias: Bias::LoraOnly,
        modules_to_save: Some(vec!["lm_head".into()]),
        init_lora_weights: serde_json::Value::Bool(false),
        use_dora: true,
        ..Default::default()
    };
    let names = attach_and_nudge(&mut m, &cfg);
    assert!(names
        .iter()
        .any(|n| n == "model.layers.0.self_attn.q_proj.bias"));
    assert!(
        !names
            .iter()
            .any(|n| n == "model.layers.0.self_attn.k_proj.bias"),
        "k_proj is not targeted"
    );
    let out = tempfile::tempdir().unwrap();
    qdora::model::adapters::save_adapter(&m, out.path(), &cfg).unwrap();
    let file = Checkpoint::open(&out.path().join("adapter_model.safetensors")).unwrap();
    assert!(file.contains("base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias"));
    assert!(file.contains("base_model.model.lm_head.weight"));
    let ids: Vec<u32> = (0..12).map(|i| (i * 7 % 96) as u32).collect();
    let want = m.logits(&ids, 1, 12).unwrap();
    let mut m2 = load(&dir, &LoadOptions::default()).unwrap();
    qdora::model::adapters::load_adapter(&mut m2, out.path()).unwrap();
    assert_eq!(m2.logits(&ids, 1, 12).unwrap(), want);
}

/// PEFT adapters with `modules_to_save` on a model whose head is tied to its embedding
/// (make_tied_modules_to_save.py): PEFT trains and saves a copy of the named module and the
/// other side of the tie keeps the base matrix, so loading one must give PEFT's logits.
#[test]
fn modules_to_save_on_tied_embeddings_matches_peft() {
    let arch = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/arch");
    for case in [
        "qwen2-tied-mts-lm_head",
        "qwen2-tied-mts-embed_tokens",
        // ensure_weight_tying: one shared copy trains for both sides, saved under both keys
        "qwen2-tied-mts-lm_head-ensure-tying",
    ] {
        let mut m = load(&arch.join("qwen2-qkv-bias"), &LoadOptions::default()).unwrap();
        qdora::model::adapters::load_adapter(&mut m, &arch.join(case)).unwrap();
        let r = Checkpoint::open(&arch.join(case).join("reference.safetensors")).unwrap();
        let (ids, b, s) = ids(&r, "input_ids");
        let d = max_diff(
            &m.logits(&ids, b, s).unwrap(),
            &r.get("logits").unwrap().to_f32().unwrap(),
        );
        assert!(d < 1e-4, "{case}: logits max diff {d}");
    }
}

/// Training with `modules_to_save = ["lm_head"]` on a tied model moves the head's copy and
/// leaves the input embedding as the base has it (and the other way round), as PEFT does;
/// the saved adapter then loads back to the same model.
#[test]
fn modules_to_save_on_tied_embeddings_trains_one_side() {
    use qdora::adapter::{LoraConfig, TargetModules};
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/arch/qwen2-qkv-bias");
    let base = load(&dir, &LoadOptions::default()).unwrap();
    let original = base.embed_tokens.to_f32().into_owned();
    for (module, key) in [
        ("lm_head", "lm_head.weight"),
        ("embed_tokens", "model.embed_tokens.weight"),
    ] {
        let mut m = base.clone();
        let cfg = LoraConfig {
            target_modules: Some(TargetModules::List(vec!["q_proj".into()])),
            modules_to_save: Some(vec![module.into()]),
            ..Default::default()
        };
        let names = attach_and_nudge(&mut m, &cfg);
        assert!(names.iter().any(|n| n == key), "{module}: {names:?}");
        // PEFT 0.21's print_trainable_parameters for this model and config (the copy counts)
        assert_eq!(
            m.trainable_summary(),
            "trainable params: 6,144 || all params: 48,048 || trainable%: 12.7872",
            "{module}"
        );
        let (embed, head) = (m.embed_tokens.to_f32(), m.head().to_f32());
        let (moved, kept) = if module == "lm_head" {
            (head, embed)
        } else {
            (embed, head)
        };
        assert_eq!(
            kept.as_ref(),
            original.as_slice(),
            "{module}: the other side moved"
        );
        assert_ne!(
            moved.as_ref(),
            original.as_slice(),
            "{module}: did not train"
        );
        let out = tempfile::tempdir().unwrap();
        qdora::model::adapters::save_adapter(&m, out.path(), &cfg).unwrap();
        let ids: Vec<u32> = (0..12).map(|i| (i * 7 % 96) as u32).collect();
        let mut m2 = base.clone();
        qdora::model::adapters::load_adapter(&mut m2, out.path()).unwrap();
        assert_eq!(
            m2.logits(&ids, 1, 12).unwrap(),
            m.logits(&ids, 1, 12).unwrap(),
            "{module}: round trip"
        );
        // Merged and exported, the untied head is written as its own matrix and the config
        // no longer ties it.
        let mut merged = m.clone();
        qdora::model::adapters::merge(&mut merged);
        let export = tempfile::tempdir().unwrap();
        let how = qdora::model::load::SaveAs::Dense(qdora::quant::Dtype::F32);
        qdora::model::load::save(&merged, export.path(), how).unwrap();
        let config = std::fs::read_to_string(export.path().join("config.json")).unwrap();
        assert!(
            config.contains("\"tie_word_embeddings\": false"),
            "{module}"
        );
        let d = max_diff(
            &load(export.path(), &LoadOptions::default())
                .unwrap()
                .logits(&ids, 1, 12)
                .unwrap(),
            &m.logits(&ids, 1, 12).unwrap(),
        );
        assert!(d < 1e-4, "{module}: merged export differs by {d}");
    }
}

/// With `ensure_weight_tying`, `modules_to_save = ["lm_head"]` on a tied model trains one
/// shared matrix for both sides, as PEFT does: its gradient is the head's plus the input
/// embedding's (each of which an untied copy gets alone), and the adapter file holds it under
/// both keys.
#[test]
fn ensure_weight_tying_trains_the_shared_matrix_with_both_gradients() {
    use qdora::adapter::{LoraConfig, TargetModules};
    use qdora::model::StepOptions;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/arch/qwen2-qkv-bias");
    let base = load(&dir, &LoadOptions::default()).unwrap();
    let ids: Vec<u32> = (0..24).map(|i| (i * 7 % 96) as u32).collect();
    let labels: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
    let opts = StepOptions {
        gradient_checkpointing: false,
        grad_scale: 1.0,
    };
    // the gradient `key` gets with modules_to_save = [module] (B = 0: every run computes the
    // same forward)
    let grad = |module: &str, tying: bool, key: &str| -> Vec<f32> {
        let mut m = base.clone();
        let mut cfg = LoraConfig {
            target_modules: Some(TargetModules::List(vec!["q_proj".into()])),
            modules_to_save: Some(vec![module.into()]),
            ..Default::default()
        };
        cfg.extra
            .insert("ensure_weight_tying".into(), serde_json::Value::Bool(tying));
        let peft = qdora::adapter::DoraDropout::Peft;
        qdora::model::adapters::attach(&mut m, &cfg, peft, &mut qdora::ops::Rng::new(1)).unwrap();
        let (_, _, g) = m
            .forward_backward(&ids, &labels, 2, 12, &opts, &mut qdora::ops::Rng::new(2))
            .unwrap();
        let found: Vec<String> = g.iter().map(|(n, _)| n.key()).collect();
        let (_, v) = g
            .iter()
            .find(|(n, _)| n.key() == key)
            .unwrap_or_else(|| panic!("{module} {tying}: no {key} in {found:?}"));
        v.clone()
    };
    let shared = grad("lm_head", true, "model.embed_tokens.weight");
    let head = grad("lm_head", false, "lm_head.weight");
    let embed = grad("embed_tokens", false, "model.embed_tokens.weight");
    let sum: Vec<f32> = head.iter().zip(&embed).map(|(a, b)| a + b).collect();
    let d = max_diff(&shared, &sum);
    assert!(
        d < 1e-5,
        "shared gradient differs from head + embedding by {d}"
    );
    assert!(
        embed.iter().any(|&v| v != 0.0),
        "the input side has a gradient"
    );
    // saved under both keys, loaded back to the same model
    let mut m = base.clone();
    let mut cfg = LoraConfig {
        target_modules: Some(TargetModules::List(vec!["q_proj".into()])),
        modules_to_save: Some(vec!["lm_head".into()]),
        ..Default::default()
    };
    cfg.extra
        .insert("ensure_weight_tying".into(), serde_json::Value::Bool(true));
    let names = attach_and_nudge(&mut m, &cfg);
    assert!(!names.iter().any(|n| n == "lm_head.weight"), "{names:?}");
    let out = tempfile::tempdir().unwrap();
    qdora::model::adapters::save_adapter(&m, out.path(), &cfg).unwrap();
    let file = Checkpoint::open(&out.path().join("adapter_model.safetensors")).unwrap();
    assert!(file.contains("base_model.model.lm_head.weight"));
    assert!(file.contains("base_model.model.model.embed_tokens.weight"));
    let mut m2 = base.clone();
    qdora::model::adapters::load_adapter(&mut m2, out.path()).unwrap();
    assert_eq!(
        m2.logits(&ids, 2, 12).unwrap(),
        m.logits(&ids, 2, 12).unwrap()
    );
}
