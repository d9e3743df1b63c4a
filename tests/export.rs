//! `qdora export` against GGUF files written by llama.cpp's own converters
//! (`tests/fixtures/gguf/make_gguf_fixtures.py`): every metadata value and every tensor byte,
//! for the five architecture fixtures, stories260K in f32/f16/bf16/Q8_0, and a PEFT LoRA adapter;
//! Q8_0 and Q4_0 blocks byte for byte against the `gguf` package's reference quantizers.

use std::path::{Path, PathBuf};

use qdora::export::{export_lora, export_model, ExportOptions, ExportType};
use qdora::gguf::{GgmlType, GgufFile, Value};
use qdora::io::Checkpoint;
use qdora::model::{adapters, load, LoadOptions};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn fixture(name: &str) -> PathBuf {
    root().join("tests/fixtures/gguf").join(name)
}

/// Metadata the converter derives from the folder name or its own model card, which qdora
/// writes differently or not at all (none of it is read by llama.cpp's loader), and the SPM
/// scores (checked in `spm_scores_follow_the_merges`).
const COSMETIC: [&str; 5] = [
    "general.name",
    "general.size_label",
    "general.base_model.",
    "general.tags",
    "tokenizer.ggml.scores",
];

fn cosmetic(k: &str) -> bool {
    COSMETIC
        .iter()
        .any(|c| k == *c || (c.ends_with('.') && k.starts_with(c)))
}

fn assert_same(reference: &Path, ours: &Path) {
    let r = GgufFile::open(reference).unwrap();
    let o = GgufFile::open(ours).unwrap();
    let tag = reference
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert_eq!(o.version, 3, "{tag}");
    for (k, v) in &r.metadata {
        if cosmetic(k) {
            continue;
        }
        let got = o.get(k).unwrap_or_else(|| panic!("{tag}: we lack {k}"));
        assert_eq!(got, v, "{tag}: metadata {k}");
    }
    for (k, _) in &o.metadata {
        assert!(
            cosmetic(k) || r.get(k).is_some(),
            "{tag}: we write {k}, the converter does not"
        );
    }
    let mut rn: Vec<_> = r.tensors.iter().map(|t| t.name.clone()).collect();
    let mut on: Vec<_> = o.tensors.iter().map(|t| t.name.clone()).collect();
    rn.sort();
    on.sort();
    assert_eq!(rn, on, "{tag}: tensor names");
    for name in &rn {
        let (rt, rb) = r.tensor(name).unwrap();
        let (ot, ob) = o.tensor(name).unwrap();
        assert_eq!(rt.shape, ot.shape, "{tag}: {name} shape");
        assert_eq!(rt.ggml_type, ot.ggml_type, "{tag}: {name} type");
        assert!(rb == ob, "{tag}: {name} bytes differ");
    }
}

fn export(model_dir: &Path, tok_dir: &Path, t: ExportType, out: &Path) {
    let m = load(model_dir, &LoadOptions::default()).unwrap();
    let opts = ExportOptions {
        ggml_type: t,
        name: "test".into(),
        tokenizer_pre: None,
    };
    export_model(&m, tok_dir, out, &opts).unwrap();
}

#[test]
fn architectures_match_llama_cpp_converter() {
    let dir = tempfile::tempdir().unwrap();
    for (name, tok) in [
        ("llama-rope-linear", "tok-spm"),
        ("llama3-rope-bias-tied", "tok-spm"),
        ("mistral-sliding-window", "tok-spm"),
        ("qwen2-qkv-bias", "tok-bpe"),
        ("qwen3-qk-norm", "tok-bpe"),
    ] {
        let out = dir.path().join(format!("{name}.gguf"));
        let model = root().join("tests/fixtures/arch").join(name);
        export(&model, &fixture(tok), ExportType::F32, &out);
        assert_same(&fixture(&format!("{name}-f32.gguf")), &out);
    }
}

#[test]
fn stories260k_matches_llama_cpp_converter_in_each_type() {
    let dir = tempfile::tempdir().unwrap();
    let model = root().join("models/stories260K");
    for (t, s) in [
        (ExportType::F32, "f32"),
        (ExportType::F16, "f16"),
        (ExportType::Bf16, "bf16"),
        (ExportType::Q8_0, "q8_0"),
    ] {
        let out = dir.path().join(format!("{s}.gguf"));
        export(&model, &model, t, &out);
        assert_same(&fixture(&format!("stories260K-{s}.gguf")), &out);
    }
}

#[test]
fn spm_scores_follow_the_merges() {
    let dir = tempfile::tempdir().unwrap();
    let model = root().join("models/stories260K");
    let out = dir.path().join("s.gguf");
    export(&model, &model, ExportType::F32, &out);
    let f = GgufFile::open(&out).unwrap();
    let (Some(Value::Array(_, tokens)), Some(Value::Array(_, scores))) = (
        f.get("tokenizer.ggml.tokens"),
        f.get("tokenizer.ggml.scores"),
    ) else {
        panic!("no tokens or scores");
    };
    let tj: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("tokenizer.json")).unwrap())
            .unwrap();
    let merges = tj["model"]["merges"].as_array().unwrap();
    let mut seen = std::collections::HashSet::new();
    for (rank, m) in merges.iter().enumerate() {
        let joined = format!("{}{}", m[0].as_str().unwrap(), m[1].as_str().unwrap());
        if !seen.insert(joined.clone()) {
            continue;
        }
        let id = tokens
            .iter()
            .position(|t| *t == Value::Str(joined.clone()))
            .unwrap_or_else(|| panic!("merge result {joined} not a token"));
        assert_eq!(scores[id], Value::F32(-(rank as f32)), "{joined}");
    }
}

#[test]
fn lora_adapter_matches_llama_cpp_lora_converter() {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = root().join("models/stories260K");
    let mut m = load(&model_dir, &LoadOptions::default()).unwrap();
    let cfg = adapters::load_adapter(&mut m, &fixture("stories260K-lora")).unwrap();
    let out = dir.path().join("lora.gguf");
    export_lora(&m, cfg.lora_alpha as f32, &out, ExportType::F32, "test").unwrap();
    assert_same(&fixture("stories260K-lora-f32.gguf"), &out);
}

#[test]
fn dora_adapter_only_is_refused_with_the_way_out() {
    let dir = tempfile::tempdir().unwrap();
    let fx = root().join("tests/fixtures");
    let mut m = load(&fx.join("models/tiny-llama"), &LoadOptions::default()).unwrap();
    adapters::load_adapter(&mut m, &fx.join("peft/dora")).unwrap();
    let out = dir.path().join("dora.gguf");
    let e = export_lora(&m, 32.0, &out, ExportType::F32, "t").unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("magnitude") && msg.contains("merged"), "{msg}");
    assert!(!out.exists());
}

#[test]
fn q8_0_and_q4_0_blocks_match_ggml_reference_bytes() {
    let ck = Checkpoint::open(&fixture("quants.safetensors")).unwrap();
    let mut i = 0;
    while ck.contains(&format!("input.{i}")) {
        let x = ck.get(&format!("input.{i}")).unwrap().to_f32().unwrap();
        for (t, key) in [(GgmlType::Q8_0, "q8_0"), (GgmlType::Q4_0, "q4_0")] {
            let mut b = Vec::new();
            t.encode(&x, &mut b);
            let want = ck.get(&format!("{key}.{i}")).unwrap().data;
            assert_eq!(b, want, "{key} case {i}");
        }
        i += 1;
    }
    assert_eq!(i, 8, "cases read");
}

#[test]
fn q4_0_export_decodes_close_to_the_weights() {
    let dir = tempfile::tempdir().unwrap();
    let model = root().join("models/stories260K");
    let out = dir.path().join("q4.gguf");
    export(&model, &model, ExportType::Q4_0, &out);
    let f = GgufFile::open(&out).unwrap();
    assert_eq!(f.get("general.file_type"), Some(&Value::U32(2)));
    let ck = Checkpoint::open(&model).unwrap();
    let (t, b) = f.tensor("blk.0.ffn_up.weight").unwrap();
    assert_eq!(t.ggml_type, GgmlType::Q4_0);
    let got = t.ggml_type.decode(b);
    let want = ck
        .get("model.layers.0.mlp.up_proj.weight")
        .unwrap()
        .to_f32()
        .unwrap();
    for (blk_w, blk_g) in want.chunks(32).zip(got.chunks(32)) {
        let amax = blk_w.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (w, g) in blk_w.iter().zip(blk_g) {
            // half a step of amax / 8, or one step at the clipped end (codes reach -8d but only 7d)
            assert!((w - g).abs() <= amax / 8.0 + amax * 1e-3, "{w} {g}");
        }
    }
    // norms stay f32; rows of 172 (down_proj's input) do not split into blocks: F16
    let (t, _) = f.tensor("blk.0.attn_norm.weight").unwrap();
    assert_eq!(t.ggml_type, GgmlType::F32);
    let (t, _) = f.tensor("blk.0.ffn_down.weight").unwrap();
    assert_eq!(t.ggml_type, GgmlType::F16);
}

#[test]
fn a_failed_export_leaves_the_existing_file_alone() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("model.gguf");
    std::fs::write(&out, b"previous").unwrap();
    // the architecture fixtures ship no tokenizer
    let model = root().join("tests/fixtures/arch/qwen2-qkv-bias");
    let m = load(&model, &LoadOptions::default()).unwrap();
    let opts = ExportOptions {
        ggml_type: ExportType::F16,
        name: "t".into(),
        tokenizer_pre: None,
    };
    let e = export_model(&m, &model, &out, &opts)
        .unwrap_err()
        .to_string();
    assert!(e.contains("tokenizer.json"), "{e}");
    assert_eq!(std::fs::read(&out).unwrap(), b"previous");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}
