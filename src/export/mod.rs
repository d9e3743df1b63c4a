//! `qdora export`: a model (its adapter merged first) as one GGUF file that llama.cpp, Ollama and
//! LM Studio load as is, or a plain LoRA adapter as a GGUF LoRA adapter (llama.cpp's `--lora`).
//!
//! What is written follows llama.cpp's own converters (`convert_hf_to_gguf.py`,
//! `convert_lora_to_gguf.py`), checked against files they wrote (`tests/export.rs`):
//! architecture metadata under `llama.*` (Llama and Mistral), `qwen2.*` or `qwen3.*`; tensor
//! names `token_embd`, `blk.N.attn_q`, ...; for the `llama` architecture the rows of q and k
//! permuted from Hugging Face's rotate-half order into llama.cpp's interleaved RoPE order; 1-D
//! tensors, norms and biases in f32, matrices in the chosen type (F16 where a row does not
//! split into 32-value blocks); Llama 3 RoPE scaling as a `rope_freqs` tensor. The tokenizer
//! goes in through [`vocab`]. Tensors are converted one at a time while the file streams out.

mod names;
pub mod vocab;

use std::borrow::Cow;
use std::path::Path;

use crate::adapter::{AdapterKind, BaseWeight};
use crate::gguf::{self, GgmlType, Value};
use crate::model::{Arch, Llama, Proj};

/// Errors of an export.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Occurs when writing the file fails.
    #[error(transparent)]
    Io(#[from] crate::io::Error),
    /// Occurs when the tokenizer cannot be expressed.
    #[error("{path}: {msg}")]
    Tokenizer {
        /// The file at fault.
        path: String,
        /// What is wrong.
        msg: String,
    },
    /// Occurs when the model or adapter has something GGUF / llama.cpp cannot express.
    #[error("{0}")]
    Unsupported(String),
}

/// Result type of the `export` module.
pub type Result<T> = std::result::Result<T, Error>;

/// The storage type of an export's matrices (`--type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportType {
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    Bf16,
    /// 8-bit blocks (ggml Q8_0).
    #[value(name = "q8_0")]
    Q8_0,
    /// 4-bit blocks (ggml Q4_0).
    #[value(name = "q4_0")]
    Q4_0,
}

impl ExportType {
    fn ggml(self) -> GgmlType {
        match self {
            Self::F32 => GgmlType::F32,
            Self::F16 => GgmlType::F16,
            Self::Bf16 => GgmlType::Bf16,
            Self::Q8_0 => GgmlType::Q8_0,
            Self::Q4_0 => GgmlType::Q4_0,
        }
    }

    /// llama.cpp's `general.file_type` (`LLAMA_FTYPE_*`).
    fn file_type(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q8_0 => 7,
            Self::Bf16 => 32,
        }
    }
}

/// Options of [`export_model`].
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// Storage type of the matrices.
    pub ggml_type: ExportType,
    /// `general.name`.
    pub name: String,
    /// The byte-level pre-tokenizer's llama.cpp name, when it is not recognized.
    pub tokenizer_pre: Option<String>,
}

/// What an export wrote.
#[derive(Debug, Clone)]
pub struct ExportSummary {
    /// Tensors written.
    pub tensors: usize,
    /// Bytes of tensor data.
    pub data_bytes: usize,
    /// Things llama.cpp will do differently from qdora (printed as warnings).
    pub warnings: Vec<String>,
}

/// A tensor to write: its GGUF name and shape, where its values come from, and whether its rows
/// are permuted into llama.cpp's RoPE order (the head count).
struct Entry<'a> {
    name: String,
    shape: Vec<usize>,
    source: Source<'a>,
    permute_heads: Option<usize>,
}

enum Source<'a> {
    Weight(&'a BaseWeight),
    Slice(&'a [f32]),
    Owned(Vec<f32>),
}

impl<'a> Entry<'a> {
    /// A tensor written as it is.
    fn plain(name: String, shape: Vec<usize>, source: Source<'a>) -> Self {
        Entry {
            name,
            shape,
            source,
            permute_heads: None,
        }
    }

    /// A norm's weight vector.
    fn norm(name: String, w: &'a [f32]) -> Self {
        Self::plain(name, vec![w.len()], Source::Slice(w))
    }

    fn values(&self) -> Cow<'_, [f32]> {
        let v: Cow<'_, [f32]> = match &self.source {
            Source::Weight(w) => w.to_f32(),
            Source::Slice(s) => Cow::Borrowed(s),
            Source::Owned(v) => Cow::Borrowed(v),
        };
        match self.permute_heads {
            Some(h) => Cow::Owned(names::permute_rope_rows(&v, h, &self.shape)),
            None => v,
        }
    }

    /// The type llama.cpp's converter would choose: f32 for 1-D tensors, norms and biases; the
    /// requested type for matrices, or F16 when a row is not a whole number of blocks.
    fn ggml_type(&self, want: GgmlType) -> GgmlType {
        let row = self.shape.last().copied().unwrap_or(1);
        let matrix_name = [".weight", ".lora_a", ".lora_b"]
            .iter()
            .any(|s| self.name.ends_with(s));
        if self.shape.len() <= 1 || self.name.ends_with("_norm.weight") || !matrix_name {
            GgmlType::F32
        } else if row % want.block_len() != 0 {
            GgmlType::F16
        } else {
            want
        }
    }
}

fn write_file(
    out: &Path,
    metadata: &[(String, Value)],
    entries: &[Entry<'_>],
    want: GgmlType,
) -> Result<(usize, usize)> {
    let table: Vec<(String, Vec<usize>, GgmlType)> = entries
        .iter()
        .map(|e| (e.name.clone(), e.shape.clone(), e.ggml_type(want)))
        .collect();
    let mut w = gguf::Writer::create(out, metadata, &table)?;
    let mut bytes = 0;
    let mut buf = Vec::new();
    for (e, (_, _, t)) in entries.iter().zip(&table) {
        buf.clear();
        t.encode(&e.values(), &mut buf);
        bytes += buf.len();
        w.write(&e.name, &buf)?;
    }
    w.finish()?;
    Ok((entries.len(), bytes))
}

/// Writes `model` (adapters merged or absent) with the tokenizer of `tokenizer_dir` as the GGUF
/// file `out` (temporary file, then rename).
///
/// # Errors
/// [`Error::Unsupported`] for an un-merged adapter, [`Error::Tokenizer`], I/O.
pub fn export_model(
    model: &Llama,
    tokenizer_dir: &Path,
    out: &Path,
    opts: &ExportOptions,
) -> Result<ExportSummary> {
    let c = &model.config;
    let mut warnings = Vec::new();
    if let (Arch::Mistral, Some(w)) = (c.arch, c.sliding_window) {
        if w < c.max_position_embeddings {
            warnings.push(format!(
                "llama.cpp runs Mistral as the llama architecture without a sliding window: \
                 its outputs match qdora's only within {w} tokens of context"
            ));
        }
    }
    let mut metadata = names::model_metadata(c, &opts.name, opts.ggml_type.file_type());
    metadata.extend(vocab::metadata(
        tokenizer_dir,
        &c.raw,
        c.vocab_size,
        opts.tokenizer_pre.as_deref(),
    )?);
    let entries = model_entries(model)?;
    let (tensors, data_bytes) = write_file(out, &metadata, &entries, opts.ggml_type.ggml())?;
    Ok(ExportSummary {
        tensors,
        data_bytes,
        warnings,
    })
}

fn model_entries(model: &Llama) -> Result<Vec<Entry<'_>>> {
    let c = &model.config;
    let (d, v) = (c.hidden_size, c.vocab_size);
    let (plain, norm) = (Entry::plain, Entry::norm);
    let mut e = Vec::new();
    if let Some(f) = names::llama3_rope_factors(c) {
        e.push(plain(
            "rope_freqs.weight".into(),
            vec![f.len()],
            Source::Owned(f),
        ));
    }
    e.push(plain(
        "token_embd.weight".into(),
        vec![v, d],
        Source::Weight(&model.embed_tokens),
    ));
    for (i, layer) in model.layers.iter().enumerate() {
        let blk = |s: &str| format!("blk.{i}.{s}");
        e.push(norm(blk("attn_norm.weight"), &layer.input_layernorm.weight));
        e.push(norm(
            blk("ffn_norm.weight"),
            &layer.post_attention_layernorm.weight,
        ));
        if let Some(n) = &layer.self_attn.q_norm {
            e.push(norm(blk("attn_q_norm.weight"), &n.weight));
        }
        if let Some(n) = &layer.self_attn.k_norm {
            e.push(norm(blk("attn_k_norm.weight"), &n.weight));
        }
        for proj in Proj::ALL {
            let l = layer.linear(proj);
            if l.adapter.is_some() {
                return Err(Error::Unsupported(format!(
                    "{} still has an adapter; merge it before exporting",
                    proj.path(i)
                )));
            }
            let heads = names::rope_permute_heads(c, proj);
            let base = names::tensor_base(proj);
            e.push(Entry {
                name: blk(&format!("{base}.weight")),
                shape: vec![l.out_features(), l.in_features()],
                source: Source::Weight(&l.weight),
                permute_heads: heads,
            });
            if let Some(b) = &l.bias {
                e.push(Entry {
                    name: blk(&format!("{base}.bias")),
                    shape: vec![b.len()],
                    source: Source::Slice(b),
                    permute_heads: heads,
                });
            }
        }
    }
    e.push(norm("output_norm.weight".into(), &model.norm.weight));
    if let Some(h) = &model.lm_head {
        e.push(plain("output.weight".into(), vec![v, d], Source::Weight(h)));
    }
    Ok(e)
}

/// Writes the LoRA adapters attached to `model` as a llama.cpp GGUF LoRA adapter: per adapted
/// linear `<name>.weight.lora_a` (r × in) and `.lora_b` (out × r, rows permuted as the base's
/// for q and k), and `adapter.lora.alpha`. llama.cpp scales each pair by `alpha / r`; where a
/// module's PEFT scaling differs (rsLoRA, `rank_pattern`, `alpha_pattern`) the difference is
/// folded into its B.
///
/// # Errors
/// [`Error::Unsupported`] for DoRA (llama.cpp has no magnitude vector: export the merged model
/// instead) or when no linear has an adapter; I/O.
pub fn export_lora(
    model: &Llama,
    lora_alpha: f32,
    out: &Path,
    ggml_type: ExportType,
    name: &str,
) -> Result<ExportSummary> {
    if !(lora_alpha.is_finite() && lora_alpha > 0.0) {
        return Err(Error::Unsupported(format!(
            "lora_alpha {lora_alpha}: llama.cpp scales a LoRA adapter by alpha / r, so alpha must be positive"
        )));
    }
    let c = &model.config;
    let mut e = Vec::new();
    for (i, layer) in model.layers.iter().enumerate() {
        for proj in Proj::ALL {
            let Some(a) = &layer.linear(proj).adapter else {
                continue;
            };
            if a.kind() == AdapterKind::Dora {
                return Err(Error::Unsupported(format!(
                    "{} is a DoRA adapter: llama.cpp's LoRA adapters have no magnitude vector. \
                     Export the merged model instead: qdora export --model M --adapter A --out F.gguf",
                    proj.path(i)
                )));
            }
            let r = a.r();
            let heads = names::rope_permute_heads(c, proj);
            let base = format!("blk.{i}.{}.weight", names::tensor_base(proj));
            let fold = a.scaling() * r as f32 / lora_alpha;
            let b = if (fold - 1.0).abs() > 1e-6 {
                Source::Owned(a.lora_b().iter().map(|v| v * fold).collect())
            } else {
                Source::Slice(a.lora_b())
            };
            e.push(Entry {
                name: format!("{base}.lora_a"),
                shape: vec![r, a.in_features()],
                source: Source::Slice(a.lora_a()),
                permute_heads: None,
            });
            e.push(Entry {
                name: format!("{base}.lora_b"),
                shape: vec![a.out_features(), r],
                source: b,
                permute_heads: heads,
            });
        }
    }
    if e.is_empty() {
        return Err(Error::Unsupported("the adapter adapts no linear".into()));
    }
    let metadata = vec![
        (
            "general.architecture".to_string(),
            Value::Str(names::arch_name(c.arch).into()),
        ),
        ("general.type".into(), Value::Str("adapter".into())),
        ("general.name".into(), Value::Str(name.into())),
        ("adapter.type".into(), Value::Str("lora".into())),
        ("adapter.lora.alpha".into(), Value::F32(lora_alpha)),
        ("general.quantization_version".into(), Value::U32(2)),
    ];
    let (tensors, data_bytes) = write_file(out, &metadata, &e, ggml_type.ggml())?;
    Ok(ExportSummary {
        tensors,
        data_bytes,
        warnings: Vec::new(),
    })
}
