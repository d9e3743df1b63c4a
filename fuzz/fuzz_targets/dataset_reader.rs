//! Fuzzes the dataset reader (JSONL / JSON / TXT, all record formats) with the stories260K
//! tokenizer: never a panic; sequences that come out have the requested length.
#![no_main]
use std::path::Path;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use qdora::model::tokenizer::Tokenizer;
use qdora::train::data::{parse, DataOptions};

static TOK: OnceLock<Tokenizer> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let tok = TOK.get_or_init(|| {
        Tokenizer::from_json_bytes(include_bytes!("../../models/stories260K/tokenizer.json")).expect("tokenizer")
    });
    let Some((&sel, rest)) = data.split_first() else { return };
    let ext = ["jsonl", "json", "txt"][(sel % 3) as usize];
    let opts = DataOptions { seq_len: 8 + (sel as usize % 5) * 8, packing: sel & 8 == 0, train_on_prompt: sel & 16 != 0, skip_bad_records: sel & 32 != 0 };
    let path = format!("fuzz.{ext}");
    if let Ok(ds) = parse(Path::new(&path), rest.to_vec(), Some(tok), &opts) {
        for s in &ds.sequences {
            assert_eq!(s.input_ids.len(), opts.seq_len);
            assert_eq!(s.labels.len(), opts.seq_len);
        }
    }
});
