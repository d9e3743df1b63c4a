//! Parquet (pyarrow and `datasets` files, one file or a folder of shards, snappy / gzip / zstd)
//! and ShareGPT `conversations` give the same tokens as the same records in the JSONL shapes,
//! and the same training run (`tests/fixtures/data/make_data_fixtures.py` made the files).

use std::path::{Path, PathBuf};
use std::process::Command;

use qdora::model::tokenizer::Tokenizer;
use qdora::train::data::{self, DataOptions};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/data")
        .join(name)
}

const CHAT_TEMPLATE: &str = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}";

/// stories260K with a chat template added (it ships none), in a temporary folder.
fn stories_with_template() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/stories260K");
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "generation_config.json",
    ] {
        std::fs::copy(src.join(f), d.path().join(f)).unwrap();
    }
    let mut tc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("tokenizer_config.json")).unwrap())
            .unwrap();
    tc["chat_template"] = CHAT_TEMPLATE.into();
    std::fs::write(d.path().join("tokenizer_config.json"), tc.to_string()).unwrap();
    d
}

fn opts() -> DataOptions {
    DataOptions {
        seq_len: 32,
        packing: true,
        train_on_prompt: false,
        skip_bad_records: false,
    }
}

#[test]
fn parquet_and_sharegpt_give_the_jsonl_tokens() {
    let model = stories_with_template();
    let tok = Tokenizer::load(model.path()).unwrap();
    for (a, b) in [
        ("text.jsonl", "text.parquet"),
        ("text.jsonl", "text-shards"),
        ("alpaca.jsonl", "alpaca.parquet"),
        ("ids.jsonl", "ids.parquet"),
        ("messages.jsonl", "sharegpt.jsonl"),
        ("messages.jsonl", "sharegpt.parquet"),
    ] {
        for packing in [true, false] {
            let o = DataOptions { packing, ..opts() };
            let x = data::load(&fixture(a), Some(&tok), &o).unwrap();
            let y = data::load(&fixture(b), Some(&tok), &o).unwrap();
            assert_eq!(x.records, y.records, "{a} vs {b}");
            assert!(x.records >= 12, "{a}: {} records", x.records);
            assert_eq!(x.sequences, y.sequences, "{a} vs {b} (packing {packing})");
            assert_eq!(x.label_tokens, y.label_tokens, "{a} vs {b}");
        }
    }
}

#[test]
fn parquet_errors_name_file_row_group_row_and_column() {
    let model = stories_with_template();
    let tok = Tokenizer::load(model.path()).unwrap();
    let err = |f: &str| {
        data::load(&fixture(f), Some(&tok), &opts())
            .unwrap_err()
            .to_string()
    };
    let e = err("bad-null.parquet");
    assert!(e.contains("bad-null.parquet (row group 1):6:"), "{e}");
    let e = err("bad-type.parquet");
    assert!(
        e.contains("bad-type.parquet (row group 0):1:") && e.contains("\"text\" must be a string"),
        "{e}"
    );
    let e = err("truncated.parquet");
    assert!(
        e.contains("truncated.parquet") && e.contains("unreadable Parquet"),
        "{e}"
    );
    // With skipping, the null row is counted and the rest is used.
    let o = DataOptions {
        skip_bad_records: true,
        ..opts()
    };
    let ds = data::load(&fixture("bad-null.parquet"), Some(&tok), &o).unwrap();
    assert_eq!((ds.records, ds.skipped.len()), (9, 1));
    assert_eq!(ds.skipped[0].0, 6);
}

#[test]
fn sharegpt_unknown_speaker_is_named() {
    let model = stories_with_template();
    let tok = Tokenizer::load(model.path()).unwrap();
    let rec = br#"{"conversations": [{"from": "human", "value": "hi"}, {"from": "robot", "value": "x"}]}"#;
    let e = data::parse(Path::new("c.jsonl"), rec.to_vec(), Some(&tok), &opts())
        .unwrap_err()
        .to_string();
    assert!(e.contains("c.jsonl:1:") && e.contains("\"robot\""), "{e}");
}

fn train_losses(model: &Path, data: &Path, out: &Path) -> Vec<f64> {
    let st = Command::new(env!("CARGO_BIN_EXE_qdora"))
        .args([
            "train",
            "--mode",
            "qdora",
            "--batch-size",
            "2",
            "--seq-len",
            "32",
        ])
        .args([
            "--max-steps",
            "3",
            "--seed",
            "5",
            "--lr",
            "1e-2",
            "--eval-every",
            "0",
        ])
        .arg("--model")
        .arg(model)
        .arg("--data")
        .arg(data)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["loss"].as_f64())
        .collect()
}

#[test]
fn qdora_runs_from_parquet_and_sharegpt_match_the_jsonl_runs() {
    let model = stories_with_template();
    let out = tempfile::tempdir().unwrap();
    for (a, b) in [
        ("messages.jsonl", "sharegpt.jsonl"),
        ("messages.jsonl", "sharegpt.parquet"),
        ("text.jsonl", "text-shards"),
    ] {
        let x = train_losses(
            model.path(),
            &fixture(a),
            &out.path().join(format!("a-{b}")),
        );
        let y = train_losses(
            model.path(),
            &fixture(b),
            &out.path().join(format!("b-{b}")),
        );
        assert_eq!(x.len(), 3, "{a}: {x:?}");
        assert_eq!(x, y, "{a} vs {b}");
    }
}
