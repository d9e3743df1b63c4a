//! Training data: the formats users bring, tokenized into fixed-length sequences with labels.
//!
//! Formats (JSONL, one record per line, a JSON array, or Parquet rows: see `parquet.rs`):
//! `{"text"}` (completion), alpaca `{"instruction", "input"?, "output"}`, chat
//! `{"messages": [{"role", "content"}]}` or ShareGPT `{"conversations": [{"from", "value"}]}`
//! (rendered with the model's chat template), pre-tokenized `{"input_ids", "labels"?}`; and
//! plain `.txt` (documents separated by `<|endoftext|>` or the tokenizer's EOS text).
//!
//! Loss masking: alpaca and chat records train on the response only (`train_on_prompt` to
//! override); prompt tokens get label -100.
//!
//! Packing (what we do): every record becomes `BOS? tokens EOS`; records are concatenated into
//! one stream that is cut into `seq_len` windows, labels carried along. Attention may cross
//! record boundaries inside a window (as HF's `group_texts` / TRL packing without
//! position-id resets); labels are never shifted across the EOS separator into masked tokens.
//! Without packing, each record is truncated or right-padded to `seq_len` (padding tokens get
//! label -100, and causal attention means real tokens never see the padding, so no attention
//! mask is needed).

use std::path::Path;

use serde_json::Value;

use super::error::{Error, Result};
use crate::model::loss::IGNORE_INDEX;
use crate::model::tokenizer::{Message, Tokenizer};

/// One training sequence of `seq_len` tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct Sequence {
    /// Token ids.
    pub input_ids: Vec<u32>,
    /// Labels (-100 = not trained on).
    pub labels: Vec<i64>,
}

/// Data preparation settings.
#[derive(Debug, Clone)]
pub struct DataOptions {
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Pack records into a stream (true) or pad each one (false).
    pub packing: bool,
    /// Train on prompt tokens of alpaca/chat records too.
    pub train_on_prompt: bool,
    /// Skip records that cannot be parsed (counted) instead of failing.
    pub skip_bad_records: bool,
}

/// A record after tokenization.
struct Tokenized {
    ids: Vec<u32>,
    labels: Vec<i64>,
    /// 1-based line (or record index) it came from.
    line: usize,
}

/// What loading a file produced.
#[derive(Debug, Clone, Default)]
pub struct Dataset {
    /// The sequences.
    pub sequences: Vec<Sequence>,
    /// Records read.
    pub records: usize,
    /// Records skipped as unparsable (with `skip_bad_records`), with their line numbers.
    pub skipped: Vec<(usize, String)>,
    /// Tokens with a label.
    pub label_tokens: usize,
    /// Records longer than `seq_len` that were truncated (without packing): (line, tokens).
    pub truncated: Vec<(usize, usize)>,
}

fn data_err(path: &Path, line: usize, msg: impl Into<String>) -> Error {
    Error::Data {
        path: path.display().to_string(),
        line,
        msg: msg.into(),
    }
}

/// Reads and tokenizes a data file. `tokenizer` may be `None` only for pre-tokenized data.
///
/// # Errors
/// [`Error::Data`] with file and line for a bad record (unless skipped), [`Error::Dataset`] for
/// an empty or unreadable file.
pub fn load(path: &Path, tokenizer: Option<&Tokenizer>, opts: &DataOptions) -> Result<Dataset> {
    let ds = if super::parquet::is_parquet(path) {
        let mut c = Collector::new(tokenizer, opts);
        super::parquet::for_each_record(path, &mut |place, v| {
            c.add(&place.label, place.row, Ok(v))
        })?;
        c.finish(path)?
    } else {
        let bytes = std::fs::read(path).map_err(|e| Error::Dataset {
            path: path.display().to_string(),
            msg: e.to_string(),
        })?;
        parse(path, bytes, tokenizer, opts)?
    };
    tracing::info!(
        data = %path.display(),
        records = ds.records,
        sequences = ds.sequences.len(),
        label_tokens = ds.label_tokens,
        "data loaded"
    );
    Ok(ds)
}

/// Records as they are read and tokenized, before packing.
struct Collector<'a> {
    tokenizer: Option<&'a Tokenizer>,
    opts: &'a DataOptions,
    ds: Dataset,
    records: Vec<Tokenized>,
}

impl<'a> Collector<'a> {
    fn new(tokenizer: Option<&'a Tokenizer>, opts: &'a DataOptions) -> Self {
        Self {
            tokenizer,
            opts,
            ds: Dataset::default(),
            records: Vec::new(),
        }
    }

    /// Tokenizes one record read at `line` of `place` (a file, or a Parquet row group), or
    /// counts it as skipped, or fails naming the place.
    fn add(
        &mut self,
        place: &str,
        line: usize,
        item: std::result::Result<Value, String>,
    ) -> Result<()> {
        let bad = |msg: String| Error::Data {
            path: place.to_string(),
            line,
            msg,
        };
        match item.and_then(|v| tokenize_record(&v, self.tokenizer, self.opts)) {
            Ok(t) if t.ids.is_empty() => {
                if self.opts.skip_bad_records {
                    self.ds.skipped.push((line, "empty record".into()));
                } else {
                    return Err(bad("empty record (no tokens)".into()));
                }
            }
            Ok(mut t) => {
                t.line = line;
                self.records.push(t);
                self.ds.records += 1;
            }
            Err(msg) if self.opts.skip_bad_records => self.ds.skipped.push((line, msg)),
            Err(msg) => return Err(bad(msg)),
        }
        Ok(())
    }

    /// Packs or pads the records into sequences.
    fn finish(self, path: &Path) -> Result<Dataset> {
        let Self {
            opts,
            mut ds,
            records,
            ..
        } = self;
        if records.is_empty() {
            return Err(Error::Dataset {
                path: path.display().to_string(),
                msg: "no usable records".into(),
            });
        }
        ds.sequences = if opts.packing {
            pack(&records, opts.seq_len)
        } else {
            ds.truncated = records
                .iter()
                .filter(|r| r.ids.len() > opts.seq_len)
                .map(|r| (r.line, r.ids.len()))
                .collect();
            pad(&records, opts.seq_len)
        };
        if ds.sequences.is_empty() {
            return Err(Error::Dataset {
                path: path.display().to_string(),
                msg: format!(
                    "fewer tokens than one sequence of {} (lower --seq-len or disable packing)",
                    opts.seq_len
                ),
            });
        }
        ds.label_tokens = ds
            .sequences
            .iter()
            .map(|s| {
                s.labels
                    .iter()
                    .skip(1)
                    .filter(|&&l| l != IGNORE_INDEX)
                    .count()
            })
            .sum();
        Ok(ds)
    }
}

/// Parses data already in memory; `path` gives the format (by extension) and names errors.
///
/// # Errors
/// As [`load`].
pub fn parse(
    path: &Path,
    bytes: Vec<u8>,
    tokenizer: Option<&Tokenizer>,
    opts: &DataOptions,
) -> Result<Dataset> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    let mut c = Collector::new(tokenizer, opts);
    if ext == "txt" {
        let text = String::from_utf8(bytes).map_err(|e| {
            let line = 1 + e.as_bytes()[..e.utf8_error().valid_up_to()]
                .iter()
                .filter(|&&b| b == b'\n')
                .count();
            data_err(path, line, "invalid UTF-8")
        })?;
        let tok = tokenizer.ok_or_else(|| Error::Dataset {
            path: path.display().to_string(),
            msg: "plain text needs a tokenizer (the model has no tokenizer.json)".into(),
        })?;
        let sep = "<|endoftext|>";
        let eos_text = tok.eos_token.clone().unwrap_or_default();
        let docs: Vec<&str> = if text.contains(sep) {
            text.split(sep).collect()
        } else if !eos_text.is_empty() && text.contains(&eos_text) {
            text.split(eos_text.as_str()).collect()
        } else {
            vec![text.as_str()]
        };
        for d in docs.iter().filter(|d| !d.trim().is_empty()) {
            let ids = tok.encode(d, true)?;
            let mut t = with_eos(ids, None, tok);
            t.line = c.records.len() + 1;
            c.records.push(t);
            c.ds.records += 1;
        }
    } else {
        let text = match String::from_utf8(bytes) {
            Ok(t) => t,
            Err(e) => {
                let line = 1 + e.as_bytes()[..e.utf8_error().valid_up_to()]
                    .iter()
                    .filter(|&&b| b == b'\n')
                    .count();
                return Err(data_err(path, line, "invalid UTF-8"));
            }
        };
        let trimmed = text.trim_start();
        let items: Vec<(usize, std::result::Result<Value, String>)> = if trimmed.starts_with('[') {
            match serde_json::from_str::<Value>(&text) {
                Ok(Value::Array(a)) => a
                    .into_iter()
                    .enumerate()
                    .map(|(i, v)| (i + 1, Ok(v)))
                    .collect(),
                Ok(_) => return Err(data_err(path, 1, "expected a JSON array of records")),
                Err(e) => return Err(data_err(path, e.line(), format!("invalid JSON: {e}"))),
            }
        } else {
            text.lines()
                .enumerate()
                .filter(|(_, l)| !l.trim().is_empty())
                .map(|(i, l)| {
                    (
                        i + 1,
                        serde_json::from_str::<Value>(l).map_err(|e| format!("invalid JSON: {e}")),
                    )
                })
                .collect()
        };
        let place = path.display().to_string();
        for (line, item) in items {
            c.add(&place, line, item)?;
        }
    }
    c.finish(path)
}

fn with_eos(mut ids: Vec<u32>, labels: Option<Vec<i64>>, tok: &Tokenizer) -> Tokenized {
    let mut labels = labels.unwrap_or_else(|| ids.iter().map(|&i| i as i64).collect());
    if let Some(e) = tok.eos_token_id {
        if ids.last() != Some(&e) {
            ids.push(e);
            labels.push(e as i64);
        }
    }
    Tokenized {
        ids,
        labels,
        line: 0,
    }
}

fn str_field<'a>(v: &'a Value, k: &str) -> std::result::Result<Option<&'a str>, String> {
    match v.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(format!("field \"{k}\" must be a string, found {other}")),
    }
}

fn tokenize_record(
    v: &Value,
    tok: Option<&Tokenizer>,
    opts: &DataOptions,
) -> std::result::Result<Tokenized, String> {
    let obj = v
        .as_object()
        .ok_or_else(|| "record is not a JSON object".to_string())?;
    if let Some(ids) = obj.get("input_ids") {
        let ids: Vec<u32> = ids
            .as_array()
            .ok_or("\"input_ids\" must be a list of integers")?
            .iter()
            .map(|x| {
                x.as_u64()
                    .filter(|&x| x <= u32::MAX as u64)
                    .map(|x| x as u32)
            })
            .collect::<Option<_>>()
            .ok_or("\"input_ids\" must be a list of non-negative integers")?;
        let labels = match obj.get("labels") {
            None | Some(Value::Null) => ids.iter().map(|&i| i as i64).collect(),
            Some(l) => {
                let l: Vec<i64> = l
                    .as_array()
                    .ok_or("\"labels\" must be a list of integers")?
                    .iter()
                    .map(|x| x.as_i64())
                    .collect::<Option<_>>()
                    .ok_or("\"labels\" must be a list of integers")?;
                if l.len() != ids.len() {
                    return Err(format!("{} labels for {} input_ids", l.len(), ids.len()));
                }
                l
            }
        };
        return Ok(Tokenized {
            ids,
            labels,
            line: 0,
        });
    }
    let tok = tok.ok_or("text records need a tokenizer (the model has no tokenizer.json)")?;
    let enc = |s: &str, special: bool| tok.encode(s, special).map_err(|e| e.to_string());
    if let Some(text) = str_field(v, "text")? {
        return Ok(with_eos(enc(text, true)?, None, tok));
    }
    if let Some(instruction) = str_field(v, "instruction")? {
        let input = str_field(v, "input")?.unwrap_or("");
        let output = str_field(v, "output")?.ok_or("alpaca record without \"output\"")?;
        let prompt = if input.is_empty() {
            format!("### Instruction:\n{instruction}\n\n### Response:\n")
        } else {
            format!("### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
        };
        let p = enc(&prompt, true)?;
        let full = enc(&format!("{prompt}{output}"), true)?;
        return Ok(masked(full, p.len(), opts.train_on_prompt, tok));
    }
    let msgs = match (obj.get("messages"), obj.get("conversations")) {
        (Some(m), _) => {
            Some(serde_json::from_value(m.clone()).map_err(|e| format!("\"messages\": {e}"))?)
        }
        (None, Some(c)) => Some(sharegpt(c)?),
        (None, None) => None,
    };
    if let Some(msgs) = msgs {
        let msgs: Vec<Message> = msgs;
        if msgs.is_empty() {
            return Err("\"messages\" is empty".into());
        }
        let last_assistant = msgs
            .iter()
            .rposition(|m| m.role == "assistant")
            .ok_or("no assistant message to train on")?;
        let prompt = tok
            .apply_chat_template(&msgs[..last_assistant], true)
            .map_err(|e| e.to_string())?;
        let full = tok
            .apply_chat_template(&msgs[..=last_assistant], false)
            .map_err(|e| e.to_string())?;
        let p = enc(&prompt, false)?;
        let f = enc(&full, false)?;
        return Ok(masked(f, p.len(), opts.train_on_prompt, tok));
    }
    Err("unknown record format: expected \"text\", \"instruction\"/\"output\", \"messages\", \"conversations\" or \"input_ids\"".into())
}

/// ShareGPT's `conversations: [{"from", "value"}]` as chat messages: `human`/`user` → user,
/// `gpt`/`assistant`/`chatgpt`/`bing`/`bard` → assistant, `system` → system.
fn sharegpt(v: &Value) -> std::result::Result<Vec<Message>, String> {
    let turns = v
        .as_array()
        .ok_or("\"conversations\" must be a list of {\"from\", \"value\"}")?;
    turns
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let from = t["from"]
                .as_str()
                .ok_or(format!("\"conversations\"[{i}] has no string \"from\""))?;
            let value = t["value"]
                .as_str()
                .ok_or(format!("\"conversations\"[{i}] has no string \"value\""))?;
            let role = match from {
                "human" | "user" => "user",
                "gpt" | "assistant" | "chatgpt" | "bing" | "bard" | "model" => "assistant",
                "system" => "system",
                other => {
                    return Err(format!(
                        "\"conversations\"[{i}]: unknown \"from\": {other:?} (human, gpt or system)"
                    ))
                }
            };
            Ok(Message {
                role: role.into(),
                content: value.into(),
            })
        })
        .collect()
}

fn masked(ids: Vec<u32>, prompt_len: usize, train_on_prompt: bool, tok: &Tokenizer) -> Tokenized {
    let labels: Vec<i64> = ids
        .iter()
        .enumerate()
        .map(|(i, &t)| {
            if i < prompt_len && !train_on_prompt {
                IGNORE_INDEX
            } else {
                t as i64
            }
        })
        .collect();
    with_eos(ids, Some(labels), tok)
}

fn pack(records: &[Tokenized], seq_len: usize) -> Vec<Sequence> {
    let mut ids = Vec::new();
    let mut labels = Vec::new();
    for r in records {
        ids.extend_from_slice(&r.ids);
        labels.extend_from_slice(&r.labels);
    }
    ids.chunks_exact(seq_len)
        .zip(labels.chunks_exact(seq_len))
        .map(|(i, l)| Sequence {
            input_ids: i.to_vec(),
            labels: l.to_vec(),
        })
        .collect()
}

fn pad(records: &[Tokenized], seq_len: usize) -> Vec<Sequence> {
    records
        .iter()
        .map(|r| {
            let n = r.ids.len().min(seq_len);
            let mut input_ids = r.ids[..n].to_vec();
            let mut labels = r.labels[..n].to_vec();
            input_ids.resize(seq_len, 0);
            labels.resize(seq_len, IGNORE_INDEX);
            Sequence { input_ids, labels }
        })
        .collect()
}

/// Splits off the last `fraction` of sequences (at least one) for validation.
pub fn split(mut seqs: Vec<Sequence>, fraction: f64) -> (Vec<Sequence>, Vec<Sequence>) {
    let n_val = ((seqs.len() as f64 * fraction).ceil() as usize)
        .clamp(1, seqs.len().saturating_sub(1).max(1));
    if seqs.len() < 2 {
        return (seqs, Vec::new());
    }
    let val = seqs.split_off(seqs.len() - n_val);
    (seqs, val)
}
