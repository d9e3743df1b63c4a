//! The properties the fuzz targets check, shared with the corpus regression test
//! (`tests/fuzz_corpus.rs`), so both run exactly the same code: any input gives a value or an
//! error, never a panic, and what parses behaves.

use std::path::Path;
use std::sync::OnceLock;

use crate::adapter::LoraConfig;
use crate::io::Checkpoint;
use crate::model::tokenizer::Tokenizer;
use crate::quant::bnb_io;
use crate::train::data::{parse, DataOptions};

/// safetensors + bitsandbytes quant-state reader: every tensor converts or errors; a 4-bit
/// weight that reads dequantizes to its logical size.
///
/// # Panics
/// When a property fails (that is the point).
pub fn checkpoint_reader(data: &[u8]) {
    let Ok(ck) = Checkpoint::from_bytes("fuzz.safetensors", data.to_vec()) else {
        return;
    };
    let keys: Vec<String> = ck.keys().map(String::from).collect();
    for k in &keys {
        if let Ok(t) = ck.get(k) {
            let _ = t.to_f32();
            let _ = t.to_i64();
        }
        if !bnb_io::is_quant_aux_key(k) && bnb_io::is_quantized(&ck, k) {
            if let Ok(w) = bnb_io::read_quantized(&ck, k) {
                if w.numel() <= 1 << 20 {
                    assert_eq!(w.dequantize().len(), w.numel());
                }
            }
        }
    }
}

/// `adapter_config.json` reader: a config that parses round-trips through the writer and
/// answers the matching questions.
///
/// # Panics
/// When a property fails.
pub fn adapter_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(cfg) = LoraConfig::from_json(text, "fuzz/adapter_config.json") else {
        return;
    };
    let again =
        LoraConfig::from_json(&cfg.to_json(), "round-trip").expect("a written config parses");
    assert_eq!(again.r, cfg.r);
    assert_eq!(again.use_dora, cfg.use_dora);
    for p in [
        "model.layers.0.self_attn.q_proj",
        "model.layers.11.mlp.down_proj",
        "lm_head",
    ] {
        let _ = cfg.is_target(p, p == "lm_head", &["q_proj", "v_proj"]);
        let _ = cfg.resolve(p);
    }
}

/// Dataset reader: the first byte picks format and options, the rest is the file; sequences
/// that come out have the requested length.
///
/// # Panics
/// When a property fails.
pub fn dataset_reader(data: &[u8]) {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    let tok = TOK.get_or_init(|| {
        Tokenizer::from_json_bytes(include_bytes!("../models/stories260K/tokenizer.json"))
            .expect("the bundled tokenizer loads")
    });
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let ext = ["jsonl", "json", "txt"][(sel % 3) as usize];
    let opts = DataOptions {
        seq_len: 8 + (sel as usize % 5) * 8,
        packing: sel & 8 == 0,
        train_on_prompt: sel & 16 != 0,
        skip_bad_records: sel & 32 != 0,
    };
    let path = format!("fuzz.{ext}");
    if let Ok(ds) = parse(Path::new(&path), rest.to_vec(), Some(tok), &opts) {
        for s in &ds.sequences {
            assert_eq!(s.input_ids.len(), opts.seq_len);
            assert_eq!(s.labels.len(), opts.seq_len);
        }
    }
}
