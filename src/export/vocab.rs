//! A Hugging Face tokenizer as llama.cpp's `tokenizer.*` metadata, as its converter writes it:
//! - SentencePiece-style (a byte-fallback BPE, Llama 2 / Mistral / stories260K): model
//!   `llama`, pre `default`, tokens with scores and types (`<0xXX>` bytes, control tokens).
//!   llama.cpp merges the adjacent pair whose result scores highest, so each token made by a
//!   merge scores `-rank` of that merge: the same merges in the same order as the `tokenizers`
//!   BPE (llama.cpp's converter writes -1000 for every token when there is no
//!   `tokenizer.model`, which makes its tokenizer merge left to right instead).
//! - Byte-level BPE (Llama 3, Qwen2/3): model `gpt2`, the pre-tokenizer's name (recognized from
//!   its regex, or given), tokens, types and merges.
//!
//! Then the special token ids, whether BOS/EOS/SEP are added, and the chat template.

use std::collections::HashMap;
use std::path::Path;

use serde_json::Value as Json;

use super::{Error, Result};
use crate::gguf::Value;
use crate::model::tokenizer::token_text;

const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;
const BYTE: i32 = 6;

/// Pre-tokenizer regexes llama.cpp implements, by the name it knows them under.
const KNOWN_PRE: [(&str, &str); 2] = [
    (
        "llama-bpe",
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ),
    (
        "qwen2",
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ),
];

fn read_json(path: &Path) -> Result<Option<Json>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::Tokenizer {
        path: path.display().to_string(),
        msg: e.to_string(),
    })?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| Error::Tokenizer {
            path: path.display().to_string(),
            msg: format!("invalid JSON: {e}"),
        })
}

/// The tokenizer metadata of the tokenizer folder `dir` (with the model's `config.json` as
/// parsed, for special token ids it lacks) for a vocabulary of `vocab_size` rows.
/// `pre` names the byte-level pre-tokenizer when it is not one qdora recognizes.
///
/// # Errors
/// [`Error::Tokenizer`] naming the file for a missing or unsupported tokenizer.
pub fn metadata(
    dir: &Path,
    config: &Json,
    vocab_size: usize,
    pre: Option<&str>,
) -> Result<Vec<(String, Value)>> {
    let tj_path = dir.join("tokenizer.json");
    let bad = |msg: String| Error::Tokenizer {
        path: tj_path.display().to_string(),
        msg,
    };
    let tj = read_json(&tj_path)?.ok_or_else(|| {
        bad("not found: llama.cpp needs the vocabulary inside the GGUF file".into())
    })?;
    let tc = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or(Json::Null);
    let model = &tj["model"];
    if model["type"] != "BPE" {
        return Err(bad(format!(
            "tokenizer model {} is not supported (BPE only)",
            model["type"]
        )));
    }
    let vocab = model["vocab"]
        .as_object()
        .ok_or_else(|| bad("model.vocab is not an object".into()))?;
    let merges = merges(&model["merges"]).map_err(bad)?;
    let mut by_id: HashMap<usize, String> = HashMap::new();
    for (tok, id) in vocab {
        let id = id
            .as_u64()
            .ok_or_else(|| bad(format!("vocab entry {tok:?} has no integer id")))?;
        by_id.insert(id as usize, tok.clone());
    }
    let base_len = by_id.len();
    // added tokens: (id → (content, special))
    let mut added: HashMap<usize, (String, bool)> = HashMap::new();
    for a in tj["added_tokens"].as_array().into_iter().flatten() {
        if let (Some(id), Some(c)) = (a["id"].as_u64(), a["content"].as_str()) {
            added.insert(id as usize, (c.to_string(), a["special"] == true));
        }
    }
    let specials = special_ids(&tc, &added, config);
    let control: Vec<usize> = specials.iter().map(|(_, id)| *id).collect();
    let byte_fallback = model["byte_fallback"] == true;
    let mut out: Vec<(String, Value)> = Vec::new();
    let (mut tokens, mut types) = (Vec::with_capacity(vocab_size), Vec::new());
    let max_id = by_id.keys().chain(added.keys()).max().copied().unwrap_or(0);
    if max_id >= vocab_size {
        return Err(bad(format!(
            "token id {max_id} does not fit the model's vocab_size {vocab_size}"
        )));
    }
    if byte_fallback {
        // SentencePiece style.
        let mut rank: HashMap<String, usize> = HashMap::new();
        for (i, (a, b)) in merges.iter().enumerate() {
            rank.entry(format!("{a}{b}")).or_insert(i);
        }
        let mut scores = Vec::with_capacity(vocab_size);
        for id in 0..vocab_size {
            let (text, ty) = if let Some((c, special)) = added.get(&id).filter(|_| id >= base_len) {
                let t = if *special || control.contains(&id) {
                    CONTROL
                } else {
                    USER_DEFINED
                };
                (c.clone(), t)
            } else if let Some(t) = by_id.get(&id) {
                let ty = if is_byte_token(t) {
                    BYTE
                } else if control.contains(&id) {
                    CONTROL
                } else {
                    NORMAL
                };
                (t.clone(), ty)
            } else {
                (format!("[PAD{id}]"), UNUSED)
            };
            let score = match rank.get(&text) {
                Some(r) => -(*r as f32),
                None if text.chars().count() > 1 && ty == NORMAL => -((merges.len() + id) as f32),
                None => 0.0,
            };
            tokens.push(text);
            types.push(ty);
            scores.push(score);
        }
        out.push(("tokenizer.ggml.model".into(), Value::Str("llama".into())));
        out.push(("tokenizer.ggml.pre".into(), Value::Str("default".into())));
        out.push(("tokenizer.ggml.tokens".into(), Value::strings(tokens)));
        out.push(("tokenizer.ggml.scores".into(), Value::f32s(scores)));
        out.push(("tokenizer.ggml.token_type".into(), Value::i32s(types)));
    } else {
        let pre = match pre {
            Some(p) => p.to_string(),
            None => recognize_pre(&tj).map_err(bad)?,
        };
        for id in 0..vocab_size {
            let (text, ty) = if let Some((c, special)) = added.get(&id) {
                let looks_special = c.starts_with("<|") && c.ends_with("|>");
                (
                    c.clone(),
                    if *special || looks_special {
                        CONTROL
                    } else {
                        USER_DEFINED
                    },
                )
            } else if let Some(t) = by_id.get(&id) {
                (t.clone(), NORMAL)
            } else {
                (format!("[PAD{id}]"), UNUSED)
            };
            tokens.push(text);
            types.push(ty);
        }
        out.push(("tokenizer.ggml.model".into(), Value::Str("gpt2".into())));
        out.push(("tokenizer.ggml.pre".into(), Value::Str(pre)));
        out.push(("tokenizer.ggml.tokens".into(), Value::strings(tokens)));
        out.push(("tokenizer.ggml.token_type".into(), Value::i32s(types)));
        out.push((
            "tokenizer.ggml.merges".into(),
            Value::strings(merges.iter().map(|(a, b)| format!("{a} {b}"))),
        ));
    }
    for (typ, id) in &specials {
        out.push((special_key(typ), Value::U32(*id as u32)));
    }
    for (typ, on) in add_special(&tj, &tc) {
        out.push((format!("tokenizer.ggml.add_{typ}_token"), Value::Bool(on)));
    }
    if let Some(t) = chat_template(&tc, dir)? {
        out.push(("tokenizer.chat_template".into(), Value::Str(t)));
    }
    Ok(out)
}

fn is_byte_token(t: &str) -> bool {
    t.len() == 6
        && t.starts_with("<0x")
        && t.ends_with('>')
        && t.get(3..5)
            .is_some_and(|h| h.chars().all(|c| c.is_ascii_hexdigit()))
}

/// The merges as pairs, from either format transformers writes (`"a b"` or `["a", "b"]`).
/// A space inside a part is written as U+0120 + 256 as llama.cpp's converter does.
fn merges(v: &Json) -> std::result::Result<Vec<(String, String)>, String> {
    let enc = |s: &str| s.replace(' ', "\u{120}");
    let mut out = Vec::new();
    for (i, m) in v.as_array().into_iter().flatten().enumerate() {
        match m {
            Json::String(s) => match s.split_once(' ') {
                Some((a, b)) => out.push((a.to_string(), b.to_string())),
                None => return Err(format!("merge {i} {s:?} is not two tokens")),
            },
            Json::Array(p) if p.len() == 2 => match (p[0].as_str(), p[1].as_str()) {
                (Some(a), Some(b)) => out.push((enc(a), enc(b))),
                _ => return Err(format!("merge {i} is not two strings")),
            },
            _ => return Err(format!("merge {i} is neither \"a b\" nor [a, b]")),
        }
    }
    Ok(out)
}

/// The name llama.cpp knows the byte-level pre-tokenizer by.
fn recognize_pre(tj: &Json) -> std::result::Result<String, String> {
    let pt = &tj["pre_tokenizer"];
    let parts: Vec<&Json> = match pt["type"].as_str() {
        Some("Sequence") => pt["pretokenizers"]
            .as_array()
            .into_iter()
            .flatten()
            .collect(),
        Some(_) => vec![pt],
        None => vec![],
    };
    for p in &parts {
        if p["type"] == "Split" {
            if let Some(re) = p["pattern"]["Regex"].as_str() {
                return KNOWN_PRE
                    .iter()
                    .find(|(_, r)| *r == re)
                    .map(|(n, _)| n.to_string())
                    .ok_or_else(|| {
                        format!(
                            "llama.cpp needs the name of this pre-tokenizer (regex {re:?}); pass \
                             --tokenizer-pre NAME (e.g. llama-bpe, qwen2, gpt-2)"
                        )
                    });
            }
        }
    }
    if parts
        .iter()
        .any(|p| p["type"] == "ByteLevel" && p["use_regex"] != false)
    {
        return Ok("gpt-2".into());
    }
    Err("no pre-tokenizer llama.cpp knows; pass --tokenizer-pre NAME".into())
}

const SPECIAL_TYPES: [&str; 7] = ["bos", "eos", "unk", "sep", "pad", "cls", "mask"];

fn special_key(typ: &str) -> String {
    let name = match typ {
        "unk" => "unknown",
        "sep" => "seperator", // llama.cpp's spelling
        "pad" => "padding",
        other => other,
    };
    format!("tokenizer.ggml.{name}_token_id")
}

/// Special token ids: from `tokenizer_config.json` (`bos_token`, ...; looked up among the added
/// tokens), else `config.json` (`bos_token_id`, ...).
fn special_ids(
    tc: &Json,
    added: &HashMap<usize, (String, bool)>,
    config: &Json,
) -> Vec<(&'static str, usize)> {
    let mut out = Vec::new();
    for typ in SPECIAL_TYPES {
        let from_tc = token_text(tc.get(format!("{typ}_token"))).and_then(|t| {
            let mut ids: Vec<usize> = added
                .iter()
                .filter(|(_, (c, _))| c == t)
                .map(|(i, _)| *i)
                .collect();
            ids.sort_unstable();
            ids.first().copied()
        });
        let id = from_tc.or_else(|| {
            config
                .get(format!("{typ}_token_id"))
                .and_then(|v| v.as_u64())
                .map(|v| v as usize)
        });
        if let Some(id) = id {
            out.push((typ, id));
        }
    }
    out
}

/// Whether BOS, SEP and EOS are added: from the post-processor's template, then
/// `tokenizer_config.json`'s `add_bos_token` / `add_eos_token` for what it leaves open.
fn add_special(tj: &Json, tc: &Json) -> Vec<(&'static str, bool)> {
    let mut out: Vec<(&'static str, bool)> = Vec::new();
    let text_of = |typ: &str| token_text(tc.get(format!("{typ}_token"))).map(str::to_string);
    let (bos, eos, cls, sep) = (
        text_of("bos"),
        text_of("eos"),
        text_of("cls"),
        text_of("sep"),
    );
    let pp = &tj["post_processor"];
    let procs: Vec<&Json> = match pp["processors"].as_array() {
        Some(a) => a.iter().collect(),
        None if !pp.is_null() => vec![pp],
        None => vec![],
    };
    let set = |out: &mut Vec<(&'static str, bool)>, k: &'static str, v: bool, force: bool| match out
        .iter_mut()
        .find(|(t, _)| *t == k)
    {
        Some(e) if force => e.1 = v,
        Some(_) => {}
        None => out.push((k, v)),
    };
    let special_id = |e: &Json| e["SpecialToken"]["id"].as_str().map(str::to_string);
    for p in procs {
        match p["type"].as_str() {
            Some("ByteLevel") => {
                set(&mut out, "bos", false, false);
                set(&mut out, "eos", false, false);
            }
            Some("TemplateProcessing") => {
                let single: Vec<&Json> = p["single"].as_array().into_iter().flatten().collect();
                let pair: Vec<&Json> = p["pair"].as_array().into_iter().flatten().collect();
                let mut first = None;
                let mut last = None;
                if single.len() > 1 {
                    first = special_id(single[0]);
                    if let Some(f) = &first {
                        let on = Some(f) == bos.as_ref() || Some(f) == cls.as_ref();
                        set(&mut out, "bos", on, true);
                    }
                    last = single.last().and_then(|e| special_id(e));
                    if let Some(l) = &last {
                        set(&mut out, "eos", Some(l) == eos.as_ref(), true);
                    }
                }
                let start = usize::from(
                    first.is_some() && pair.first().and_then(|e| special_id(e)) == first,
                );
                let stop = if last.is_some() && pair.last().and_then(|e| special_id(e)) == last {
                    pair.len().saturating_sub(1)
                } else {
                    pair.len()
                };
                let mid = pair.get(start..stop).unwrap_or(&[]);
                if mid.len() > 2 && seq(mid.first()) == Some("A") && seq(mid.last()) == Some("B") {
                    let inner = &mid[1..mid.len() - 1];
                    let is_sep = |e: &&Json| {
                        special_id(e)
                            .is_some_and(|s| Some(&s) == sep.as_ref() || Some(&s) == eos.as_ref())
                    };
                    let add_sep = (inner.first().is_some_and(is_sep) && last.is_none())
                        || (inner.len() == 2 && inner.get(1).is_some_and(is_sep));
                    set(&mut out, "sep", add_sep, true);
                }
            }
            _ => {}
        }
    }
    for typ in SPECIAL_TYPES {
        if let Some(b) = tc.get(format!("add_{typ}_token")).and_then(|v| v.as_bool()) {
            set(&mut out, typ, b, false);
        }
    }
    out
}

/// The id of a `{"Sequence": {"id": "A"}}` template entry.
fn seq<'a>(e: Option<&&'a Json>) -> Option<&'a str> {
    e.and_then(|e| e["Sequence"]["id"].as_str())
}

fn chat_template(tc: &Json, dir: &Path) -> Result<Option<String>> {
    if let Some(t) = tc.get("chat_template").and_then(|v| v.as_str()) {
        return Ok(Some(t.to_string()));
    }
    let p = dir.join("chat_template.jinja");
    if p.exists() {
        return std::fs::read_to_string(&p)
            .map(Some)
            .map_err(|e| Error::Tokenizer {
                path: p.display().to_string(),
                msg: e.to_string(),
            });
    }
    Ok(None)
}
