//! The model runtime against transformers 5.24 references: logits, loss, hidden states and
//! greedy generations of tiny-llama (f32 and bitsandbytes NF4), and the pretrained stories260K
//! (logits, golden greedy texts, tokenization).

use std::path::{Path, PathBuf};

use qdora::io::Checkpoint;
use qdora::model::generate::{generate, GenerateOptions};
use qdora::model::tokenizer::Tokenizer;
use qdora::model::{load, LoadOptions};

mod common;
use common::{ids, max_diff};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

fn check_model(dir: &Path) {
    let mut m = load(dir, &LoadOptions::default()).unwrap();
    let r = Checkpoint::open(&dir.join("reference.safetensors")).unwrap();
    let (input, b, t) = ids(&r, "input_ids");
    let logits = m.logits(&input, b, t).unwrap();
    let want = r.get("logits").unwrap().to_f32().unwrap();
    let d = max_diff(&logits, &want);
    assert!(d < 1e-4, "{}: logits max diff {d}", dir.display());
    let hs = m.hidden_states(&input, b, t).unwrap();
    for (i, h) in hs.iter().enumerate() {
        let want = r
            .get(&format!("hidden_states.{i}"))
            .unwrap()
            .to_f32()
            .unwrap();
        let d = max_diff(h, &want);
        assert!(
            d < 1e-4,
            "{}: hidden_states.{i} max diff {d}",
            dir.display()
        );
    }
    let labels: Vec<i64> = input.iter().map(|&x| x as i64).collect();
    let (sum, count) = m.loss(&input, &labels, b, t).unwrap();
    let loss = (sum / count as f64) as f32;
    let want = r.get("loss").unwrap().to_f32().unwrap()[0];
    assert!(
        (loss - want).abs() < 1e-5,
        "{}: loss {loss} vs {want}",
        dir.display()
    );
    // KV-cached decoding, one token at a time (the 4-bit base's few-rows route), against the
    // same reference logits at every position of the first sequence.
    let v = m.config.vocab_size;
    let want = r.get("logits").unwrap().to_f32().unwrap();
    let mut cache = m.new_cache();
    for i in 0..t {
        let last = m.forward_cached(&input[i..i + 1], &mut cache).unwrap();
        let d = max_diff(&last, &want[i * v..(i + 1) * v]);
        assert!(d < 1e-4, "{}: cached step {i}: {d}", dir.display());
    }
    let (prompt, _, _) = ids(&r, "gen_prompt_ids");
    let (full, _, _) = ids(&r, "gen_output_ids");
    let opts = GenerateOptions {
        max_new_tokens: full.len() - prompt.len(),
        ..Default::default()
    };
    let out = generate(&mut m, &prompt, &opts, &mut |_| {}).unwrap();
    assert_eq!(
        out,
        full[prompt.len()..],
        "{}: greedy generation",
        dir.display()
    );
}

#[test]
fn tiny_llama_matches_transformers() {
    check_model(&root().join("tests/fixtures/models/tiny-llama"));
}

#[test]
fn tiny_llama_nf4_matches_transformers() {
    check_model(&root().join("tests/fixtures/models/tiny-llama-bnb-nf4"));
}

#[test]
fn stories260k_logits_and_golden_generations() {
    let dir = root().join("models/stories260K");
    let mut m = load(&dir, &LoadOptions::default()).unwrap();
    let r = Checkpoint::open(&dir.join("reference.safetensors")).unwrap();
    let (input, b, t) = ids(&r, "input_ids");
    let d = max_diff(
        &m.logits(&input, b, t).unwrap(),
        &r.get("logits").unwrap().to_f32().unwrap(),
    );
    assert!(d < 1e-4, "stories260K logits max diff {d}");
    for key in [
        "golden_bos_ids",
        "golden_once_upon_a_time_ids",
        "golden_tom_dog_ids",
    ] {
        let (golden, _, _) = ids(&r, key);
        // Find the prompt: the golden continuation of the BOS run starts right after BOS; the
        // others start after their prompt's ids, which verification.json lists.
        let prompt_len = match key {
            "golden_bos_ids" => 1,
            "golden_once_upon_a_time_ids" => 5,
            _ => prompt_len_for(&dir, "Tom had a big dog named Max."),
        };
        let opts = GenerateOptions {
            max_new_tokens: golden.len() - prompt_len,
            stop_ids: vec![1],
            ..Default::default()
        };
        let out = generate(&mut m, &golden[..prompt_len], &opts, &mut |_| {}).unwrap();
        assert_eq!(out, golden[prompt_len..], "{key}");
    }
}

fn prompt_len_for(dir: &Path, text: &str) -> usize {
    let tok = Tokenizer::load(dir).unwrap();
    tok.encode(text, true).unwrap().len()
}

#[test]
fn stories260k_tokenizer_matches_llama2c() {
    let dir = root().join("models/stories260K");
    let tok = Tokenizer::load(&dir).unwrap();
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("verification.json")).unwrap())
            .unwrap();
    let cases = v["tokenization"].as_array().unwrap();
    assert!(cases.len() >= 8);
    for c in cases {
        let text = c["text"].as_str().unwrap();
        let want: Vec<u32> = c["llama2c_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(tok.encode(text, true).unwrap(), want, "{text:?}");
    }
}
