//! Every PEFT 0.21 case in tests/fixtures/peft (lora, dora, rslora, qlora, qdora,
//! dora-all-linear): logits, loss, every gradient, DoRA norms and initial magnitudes, merged
//! weights and logits (dense merge, and the re-quantized merge's bytes for 4-bit bases).

use std::path::{Path, PathBuf};

use qdora::adapter::merge::merged_weight;
use qdora::adapter::{BaseWeight, LoraConfig};
use qdora::io::Checkpoint;
use qdora::model::adapters::{attach, load_adapter, merge};
use qdora::model::{load, Llama, LoadOptions, Proj};
use qdora::ops::Rng;

mod common;
use common::{ids, max_diff, mean_loss_and_grads};
use qdora::quant::{QuantizeOptions, QuantizedWeight};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn base_of(case: &str) -> PathBuf {
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("MANIFEST.json")).unwrap())
            .unwrap();
    let c = m["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == format!("peft/{case}"))
        .unwrap();
    root().join(c["params"]["base_model"].as_str().unwrap())
}

fn batch(r: &Checkpoint) -> (Vec<u32>, Vec<i64>, usize, usize) {
    let (ids, b, t) = ids(r, "input_ids");
    let labels = r.get("labels").unwrap().to_i64().unwrap();
    (ids, labels, b, t)
}

fn loaded(case: &str) -> (Llama, LoraConfig, Checkpoint) {
    let dir = root().join("peft").join(case);
    let mut m = load(&base_of(case), &LoadOptions::default()).unwrap();
    let cfg = load_adapter(&mut m, &dir).unwrap();
    let r = Checkpoint::open(&dir.join("reference.safetensors")).unwrap();
    (m, cfg, r)
}

fn check_case(case: &str) {
    let (mut m, _cfg, r) = loaded(case);
    let (ids, labels, b, t) = batch(&r);
    let d = max_diff(
        &m.logits(&ids, b, t).unwrap(),
        &r.get("logits").unwrap().to_f32().unwrap(),
    );
    assert!(d < 1e-4, "{case}: logits max diff {d}");
    // Loss and gradients of the mean loss, in training mode (no dropout in these fixtures).
    let (loss, grads) = mean_loss_and_grads(&mut m, &ids, &labels, b, t);
    let loss = loss as f32;
    let want = r.get("loss").unwrap().to_f32().unwrap()[0];
    assert!((loss - want).abs() < 1e-5, "{case}: loss {loss} vs {want}");
    let ref_grads: Vec<&str> = r
        .keys()
        .filter(|k| k.starts_with("base_model.model."))
        .collect();
    assert_eq!(
        grads.len(),
        ref_grads.len(),
        "{case}: number of gradient tensors"
    );
    for (name, g) in &grads {
        let want = r
            .get(&name.key())
            .unwrap_or_else(|_| panic!("{case}: no reference gradient {name}"))
            .to_f32()
            .unwrap();
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = max_diff(g, &want);
        assert!(
            d <= 1e-4 * scale + 1e-7,
            "{case}: gradient {name} max diff {d} (tensor max {scale})"
        );
        assert!(
            g.iter().any(|v| *v != 0.0),
            "{case}: {name} received a zero gradient"
        );
    }
    // DoRA weight norms.
    for k in r.keys().filter(|k| k.starts_with("weight_norm.")) {
        let module = k.trim_start_matches("weight_norm.");
        let (li, name) = split(module);
        let l = m.layers[li].linear(name);
        let got = l.adapter.as_ref().unwrap().weight_norm(&l.weight);
        let want = r.get(k).unwrap().to_f32().unwrap();
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-5 * w.abs(), "{case}: {k} {g} vs {w}");
        }
    }
}

/// `model.layers.{i}.{group}.{name}` → (i, the linear).
fn split(module: &str) -> (usize, Proj) {
    let parts: Vec<&str> = module.split('.').collect();
    let proj = Proj::from_name(parts[4]).unwrap_or_else(|| panic!("{module}: not a linear"));
    (parts[2].parse().unwrap(), proj)
}

fn check_merge(case: &str) {
    let (mut m, cfg, r) = loaded(case);
    let (ids, _, b, t) = batch(&r);
    let quantized = m.layers[0].linear(Proj::QProj).weight.is_quantized();
    // Merged weights of the stored modules.
    let prefix = if quantized {
        "merged_dense."
    } else {
        "merged."
    };
    for k in r
        .keys()
        .filter(|k| k.starts_with(prefix) && k.ends_with(".weight"))
    {
        let module = k.trim_start_matches(prefix).trim_end_matches(".weight");
        let (li, name) = split(module);
        let l = m.layers[li].linear(name);
        let got = merged_weight(&l.weight, l.adapter.as_ref().unwrap());
        let want = r.get(k).unwrap().to_f32().unwrap();
        for (g, w) in got.iter().zip(&want) {
            assert!(
                (g - w).abs() <= 1e-5 + 1e-5 * w.abs(),
                "{case}: {k} {g} vs {w}"
            );
        }
        if quantized {
            // PEFT re-quantizes the merged weight with the base's settings: compare bytes.
            let q = match &l.weight {
                BaseWeight::Quant(q) => q,
                _ => unreachable!(),
            };
            let opts = QuantizeOptions {
                quant_type: q.quant_type,
                blocksize: q.blocksize,
                double_quant: matches!(q.absmax, qdora::quant::Absmax::Nested { .. }),
            };
            let rq = QuantizedWeight::quantize(&got, &q.shape, q.dtype, opts).unwrap();
            let key = format!("merged.{module}.weight");
            assert_eq!(
                rq.packed,
                r.get(&key).unwrap().data,
                "{case}: re-quantized packed bytes"
            );
            assert_eq!(
                rq.quant_state_json().as_bytes(),
                r.get(&format!("{key}.quant_state.bitsandbytes__nf4"))
                    .unwrap()
                    .data,
                "{case}: re-quantized quant state"
            );
        }
    }
    let key = if quantized {
        "logits_merged_dense"
    } else {
        "logits_merged"
    };
    merge(&mut m);
    let d = max_diff(
        &m.logits(&ids, b, t).unwrap(),
        &r.get(key).unwrap().to_f32().unwrap(),
    );
    assert!(d < 1e-4, "{case}: {key} max diff {d}");
    // Fresh DoRA magnitudes = ‖W‖ per row.
    let init = root()
        .join("peft")
        .join(case)
        .join("init_magnitude.safetensors");
    if init.exists() {
        let init = Checkpoint::open(&init).unwrap();
        let mut fresh = load(&base_of(case), &LoadOptions::default()).unwrap();
        attach(&mut fresh, &cfg, Default::default(), &mut Rng::new(0)).unwrap();
        for k in init.keys() {
            let module = k
                .trim_start_matches("base_model.model.")
                .trim_end_matches(".lora_magnitude_vector");
            let (li, name) = split(module);
            let got = fresh.layers[li]
                .linear(name)
                .adapter
                .as_ref()
                .unwrap()
                .magnitude()
                .unwrap()
                .to_vec();
            let want = init.get(k).unwrap().to_f32().unwrap();
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() <= 1e-5 * w.abs(),
                    "{case}: init magnitude {k}"
                );
            }
        }
    }
}

macro_rules! peft_case {
    ($name:ident, $case:expr) => {
        #[test]
        fn $name() {
            check_case($case);
            check_merge($case);
        }
    };
}

peft_case!(lora, "lora");
peft_case!(dora, "dora");
peft_case!(rslora, "rslora");
peft_case!(qlora, "qlora");
peft_case!(qdora, "qdora");
peft_case!(dora_all_linear, "dora-all-linear");
