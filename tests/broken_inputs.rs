//! A corpus of broken inputs, each asserting the exact error kind (issue 7): truncated and
//! lying safetensors, NaN weights, inconsistent 4-bit quant states, adapters with missing /
//! extra / misshaped tensors, configs that disagree with weights, bad token ids, broken data.

use std::path::{Path, PathBuf};

use qdora::adapter::LoraConfig;
use qdora::io::{self, Checkpoint, OwnedTensor};
use qdora::model::adapters::load_adapter;
use qdora::model::{load, LoadOptions};
use qdora::quant::bnb_io;
use qdora::train::data::{self, DataOptions};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// A copy of a fixture folder in a temp dir (so files can be damaged).
fn copy_dir(src: &Path) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), d.path().join(e.file_name())).unwrap();
    }
    d
}

/// Rewrites `model.safetensors` of `dir` with `edit` applied to the tensor list.
fn edit_checkpoint(dir: &Path, edit: impl FnOnce(&mut Vec<OwnedTensor>)) {
    let p = dir.join("model.safetensors");
    let ck = Checkpoint::open(&p).unwrap();
    let mut ts: Vec<OwnedTensor> = ck
        .keys()
        .map(|k| {
            let t = ck.get(k).unwrap();
            OwnedTensor {
                name: k.to_string(),
                dtype: t.dtype,
                shape: t.shape.clone(),
                data: t.data.to_vec(),
            }
        })
        .collect();
    drop(ck);
    edit(&mut ts);
    io::write_safetensors(&p, &ts, &io::pt_metadata()).unwrap();
}

#[test]
fn truncated_safetensors_is_a_format_error() {
    let d = copy_dir(&fixtures().join("models/tiny-llama"));
    let p = d.path().join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let e = Checkpoint::open(&p).err().unwrap();
    assert!(matches!(e, io::Error::Format { .. }), "{e}");
    assert!(e.to_string().contains("outside the"), "{e}");
    std::fs::write(&p, &bytes[..5]).unwrap();
    assert!(matches!(
        Checkpoint::open(&p),
        Err(io::Error::Format { .. })
    ));
}

#[test]
fn header_lying_about_offsets_is_a_format_error() {
    let body = br#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,12]}}"#;
    let mut bytes = (body.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(body);
    bytes.extend_from_slice(&[0u8; 16]);
    let e = Checkpoint::from_bytes("lying.safetensors", bytes)
        .err()
        .unwrap();
    assert!(matches!(e, io::Error::Format { .. }));
    assert!(e.to_string().contains("tensor w: 12 bytes"), "{e}");
    let mut bytes = (u64::MAX).to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}");
    assert!(matches!(
        Checkpoint::from_bytes("huge-header", bytes),
        Err(io::Error::Format { .. })
    ));
}

#[test]
fn nan_and_inf_weights_are_refused_with_the_tensor_named() {
    let d = copy_dir(&fixtures().join("models/tiny-llama"));
    edit_checkpoint(d.path(), |ts| {
        let t = ts
            .iter_mut()
            .find(|t| t.name == "model.layers.1.mlp.up_proj.weight")
            .unwrap();
        t.data[40..44].copy_from_slice(&f32::NAN.to_le_bytes());
    });
    let e = load(d.path(), &LoadOptions::default()).err().unwrap();
    assert!(
        matches!(e, qdora::model::Error::NonFinite { index: 10, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("model.layers.1.mlp.up_proj.weight"));
}

#[test]
fn absmax_of_the_wrong_length_is_inconsistent() {
    let d = copy_dir(&fixtures().join("models/tiny-llama-bnb-nf4"));
    edit_checkpoint(d.path(), |ts| {
        let t = ts
            .iter_mut()
            .find(|t| t.name == "model.layers.0.self_attn.q_proj.weight.absmax")
            .unwrap();
        t.data.pop();
        t.shape = vec![t.data.len()];
    });
    let ck = Checkpoint::open(d.path()).unwrap();
    let e = bnb_io::read_quantized(&ck, "model.layers.0.self_attn.q_proj.weight").unwrap_err();
    assert!(matches!(e, qdora::quant::Error::Inconsistent { .. }), "{e}");
    assert!(e.to_string().contains("absmax has 63 entries"), "{e}");
}

#[test]
fn quant_state_with_wrong_shape_or_bad_json_is_named() {
    let key = "model.layers.0.self_attn.q_proj.weight";
    for (json, want_bad_json) in [
        (
            r#"{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [64, 32], "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.1}"#,
            false,
        ),
        (
            r#"{"quant_type": "nf4", "blocksize": 64, "dtype": "float32""#,
            true,
        ),
        (
            r#"{"quant_type": "nf4", "blocksize": 48, "dtype": "float32", "shape": [64, 64]}"#,
            false,
        ),
        (
            r#"{"quant_type": "nf4", "blocksize": 64, "dtype": "int8", "shape": [64, 64]}"#,
            false,
        ),
    ] {
        let d = copy_dir(&fixtures().join("models/tiny-llama-bnb-nf4"));
        edit_checkpoint(d.path(), |ts| {
            let t = ts
                .iter_mut()
                .find(|t| t.name == format!("{key}.quant_state.bitsandbytes__nf4"))
                .unwrap();
            t.data = json.as_bytes().to_vec();
            t.shape = vec![t.data.len()];
        });
        let ck = Checkpoint::open(d.path()).unwrap();
        let e = bnb_io::read_quantized(&ck, key).unwrap_err();
        let msg = e.to_string();
        if want_bad_json {
            assert!(
                matches!(e, qdora::quant::Error::BadQuantState { .. }),
                "{msg}"
            );
        } else {
            assert!(
                matches!(
                    e,
                    qdora::quant::Error::Inconsistent { .. }
                        | qdora::quant::Error::UnsupportedBlocksize(48)
                        | qdora::quant::Error::UnsupportedDtype(_)
                ),
                "{msg}"
            );
        }
        if !matches!(
            e,
            qdora::quant::Error::UnsupportedBlocksize(_) | qdora::quant::Error::UnsupportedDtype(_)
        ) {
            assert!(msg.contains(key), "{msg}");
        }
        // The model loader surfaces the same error.
        assert!(load(d.path(), &LoadOptions::default()).is_err());
    }
}

#[test]
fn adapter_with_missing_extra_and_misshaped_tensors_lists_every_problem() {
    let d = copy_dir(&fixtures().join("peft/dora"));
    let p = d.path().join("adapter_model.safetensors");
    let ck = Checkpoint::open(&p).unwrap();
    let mut ts: Vec<OwnedTensor> = ck
        .keys()
        .filter(|k| !k.ends_with("layers.0.self_attn.q_proj.lora_A.weight"))
        .map(|k| {
            let t = ck.get(k).unwrap();
            let mut o = OwnedTensor {
                name: k.to_string(),
                dtype: t.dtype,
                shape: t.shape.clone(),
                data: t.data.to_vec(),
            };
            if k.ends_with("layers.1.mlp.up_proj.lora_B.weight") {
                o.shape = vec![o.shape[1], o.shape[0]];
            }
            o
        })
        .collect();
    ts.push(OwnedTensor::f32(
        "base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight",
        vec![1],
        &[0.0],
    ));
    drop(ck);
    io::write_safetensors(&p, &ts, &io::pt_metadata()).unwrap();
    let mut m = load(
        &fixtures().join("models/tiny-llama"),
        &LoadOptions::default(),
    )
    .unwrap();
    let e = load_adapter(&mut m, d.path()).unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(e, qdora::model::Error::Adapter(qdora::adapter::Error::Mismatch { ref problems, .. }) if problems.len() == 3),
        "{msg}"
    );
    assert!(
        msg.contains("missing base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"),
        "{msg}"
    );
    assert!(
        msg.contains("layers.1.mlp.up_proj.lora_B.weight: shape [8, 176], expected [176, 8]"),
        "{msg}"
    );
    assert!(
        msg.contains("unexpected base_model.model.model.layers.9"),
        "{msg}"
    );
}

#[test]
fn adapter_config_errors_name_the_field() {
    for (text, field) in [
        (r#"{"peft_type": "PREFIX_TUNING"}"#, "peft_type"),
        (r#"{"peft_type": "LORA", "r": 0}"#, "r"),
        (
            r#"{"peft_type": "LORA", "lora_dropout": 1.5}"#,
            "lora_dropout",
        ),
        (
            r#"{"peft_type": "LORA", "init_lora_weights": "pissa"}"#,
            "init_lora_weights",
        ),
        (
            r#"{"peft_type": "LORA", "rank_pattern": {"q_proj(": 4}}"#,
            "rank_pattern",
        ),
        (
            r#"{"peft_type": "LORA", "fan_in_fan_out": true}"#,
            "fan_in_fan_out",
        ),
    ] {
        let e = LoraConfig::from_json(text, "a/adapter_config.json").unwrap_err();
        assert!(
            matches!(e, qdora::adapter::Error::Config { field: ref f, .. } if f == field),
            "{text}: {e}"
        );
    }
}

#[test]
fn config_that_disagrees_with_the_weights_is_a_shape_error() {
    let d = copy_dir(&fixtures().join("models/tiny-llama"));
    let p = d.path().join("config.json");
    let text = std::fs::read_to_string(&p)
        .unwrap()
        .replace("\"intermediate_size\": 176", "\"intermediate_size\": 128");
    std::fs::write(&p, text).unwrap();
    let e = load(d.path(), &LoadOptions::default()).err().unwrap();
    assert!(
        matches!(e, qdora::model::Error::Shape { ref name, .. } if name == "model.layers.0.mlp.gate_proj.weight"),
        "{e}"
    );
    std::fs::remove_file(d.path().join("model.safetensors")).unwrap();
    let e = load(d.path(), &LoadOptions::default()).err().unwrap();
    assert!(
        matches!(e, qdora::model::Error::Io(io::Error::Io { .. })),
        "{e}"
    );
}

#[test]
fn token_ids_outside_the_vocabulary_are_input_errors() {
    let mut m = load(
        &fixtures().join("models/tiny-llama"),
        &LoadOptions::default(),
    )
    .unwrap();
    let e = m.logits(&[1, 2, 256], 1, 3).unwrap_err();
    assert!(matches!(e, qdora::model::Error::Input(_)), "{e}");
    assert!(e.to_string().contains("position 2"));
    let e = m.loss(&[1, 2, 3], &[1, 2, 999], 1, 3).unwrap_err();
    assert!(e.to_string().contains("label 999"), "{e}");
}

#[test]
fn tokenizer_that_does_not_load_is_named() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("tokenizer.json"), "{ not json").unwrap();
    let e = qdora::model::tokenizer::Tokenizer::load(d.path())
        .err()
        .unwrap();
    assert!(
        matches!(e, qdora::model::Error::Tokenizer { ref path, .. } if path.ends_with("tokenizer.json")),
        "{e}"
    );
}

#[test]
fn broken_data_files_give_file_and_line() {
    let opts = DataOptions {
        seq_len: 4,
        packing: true,
        train_on_prompt: false,
        skip_bad_records: false,
    };
    let cases: [(&str, &[u8], usize); 4] = [
        (
            "bad.jsonl",
            b"{\"input_ids\": [1,2,3,4,5]}\n{\"input_ids\": [1,2\n",
            2,
        ),
        (
            "utf8.jsonl",
            b"{\"input_ids\": [1,2,3,4,5]}\n{\"text\": \"\xff\xfe\"}\n",
            2,
        ),
        (
            "types.jsonl",
            b"{\"input_ids\": [1,2,3,4,5]}\n\n{\"input_ids\": [1,-2]}\n",
            3,
        ),
        (
            "labels.jsonl",
            b"{\"input_ids\": [1,2,3,4,5], \"labels\": [1]}\n",
            1,
        ),
    ];
    for (name, bytes, line) in cases {
        let e = data::parse(Path::new(name), bytes.to_vec(), None, &opts).unwrap_err();
        assert!(
            matches!(e, qdora::train::Error::Data { line: l, .. } if l == line),
            "{name}: {e}"
        );
        assert!(e.to_string().starts_with(&format!("{name}:{line}:")), "{e}");
    }
    let e = data::parse(Path::new("empty.jsonl"), b"\n\n".to_vec(), None, &opts).unwrap_err();
    assert!(matches!(e, qdora::train::Error::Dataset { .. }), "{e}");
    let skip = DataOptions {
        skip_bad_records: true,
        ..opts
    };
    let ds = data::parse(Path::new("bad.jsonl"), cases[0].1.to_vec(), None, &skip).unwrap();
    assert_eq!(ds.skipped.len(), 1);
    assert_eq!(ds.skipped[0].0, 2);
}

#[test]
fn alpaca_and_chat_records_train_on_the_response_only() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/stories260K");
    let mut tok = qdora::model::tokenizer::Tokenizer::load(&dir).unwrap();
    tok.chat_template = Some("{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}".into());
    let opts = DataOptions {
        seq_len: 64,
        packing: false,
        train_on_prompt: false,
        skip_bad_records: false,
    };
    let text = br#"{"instruction": "Tell a story", "input": "", "output": "Lily saw a cat."}
{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello Tom."}]}
"#;
    let ds = data::parse(Path::new("mix.jsonl"), text.to_vec(), Some(&tok), &opts).unwrap();
    for (seq, answer) in ds.sequences.iter().zip(["Lily saw a cat.", "Hello Tom."]) {
        let trained: Vec<u32> = seq
            .labels
            .iter()
            .filter(|&&l| l >= 0)
            .map(|&l| l as u32)
            .collect();
        let text = tok.decode(&trained).unwrap();
        assert!(
            text.trim().ends_with(answer.trim_end_matches('.')) || text.contains(answer),
            "trained on {text:?}"
        );
        assert!(
            !text.contains("Tell a story") && !text.contains("Hi\n"),
            "prompt trained: {text:?}"
        );
        assert_eq!(seq.labels[0], -100);
    }
    let all = DataOptions {
        train_on_prompt: true,
        ..opts
    };
    let ds = data::parse(Path::new("mix.jsonl"), text.to_vec(), Some(&tok), &all).unwrap();
    assert_ne!(ds.sequences[0].labels[1], -100);
    // Without packing, over-long records are reported with their line.
    let long = format!("{{\"text\": \"{}\"}}\n", "Lily ran. ".repeat(40));
    let ds = data::parse(
        Path::new("long.jsonl"),
        long.into_bytes(),
        Some(&tok),
        &opts,
    )
    .unwrap();
    assert_eq!(ds.truncated.len(), 1);
    assert_eq!(ds.truncated[0].0, 1);
}
