//! Loading a Llama-family model from a Hugging Face folder (`config.json` + safetensors, single
//! or sharded, f32/bf16/f16, or bitsandbytes 4-bit), checking every tensor's shape against the
//! config; optional NF4/FP4 quantization of the decoder linears while loading (QLoRA/QDoRA on a
//! dense checkpoint), one tensor at a time. Also writes a full checkpoint back.

use std::path::Path;

use super::config::{Arch, LlamaConfig};
use super::error::{Error, Result};
use super::layers::{Attention, Block, Linear, Mlp, RmsNorm};
use super::llama::Llama;
use super::params::Proj;
use crate::adapter::BaseWeight;
use crate::io::{self, Checkpoint, OwnedTensor, StDtype};
use crate::ops::bf16::ComputeDtype;
use crate::quant::{bnb_io, Dtype, QuantizeOptions, QuantizedWeight};

/// How to store the base weights.
#[derive(Debug, Clone, Copy, Default)]
pub enum BaseStorage {
    /// As in the checkpoint: dense stays dense (f32), 4-bit stays 4-bit.
    #[default]
    AsStored,
    /// Quantize dense decoder linears while loading (4-bit ones stay as they are).
    Quantize(QuantizeOptions),
    /// Dequantize 4-bit linears to dense f32 (for full fine-tuning or dense LoRA/DoRA).
    Dense,
}

/// Options for [`load`].
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Base weight storage.
    pub storage: BaseStorage,
    /// What the weights compute in (resolved): with bf16, each dense weight is rounded to bf16
    /// as it is read (so no f32 copy of the whole model is ever held) and 4-bit weights compute
    /// in bf16. For a model whose weights will train, leave it f32.
    pub compute: ComputeDtype,
}

struct Loader<'a> {
    ckpt: &'a Checkpoint,
    path: String,
}

impl Loader<'_> {
    fn dense(&self, key: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let t = self.ckpt.get(key)?;
        if t.shape != shape {
            return Err(Error::Shape {
                path: self.path.clone(),
                name: key.into(),
                expected: shape.to_vec(),
                got: t.shape.clone(),
            });
        }
        let v = t.to_f32()?;
        if let Some(index) = v.iter().position(|x| !x.is_finite()) {
            return Err(Error::NonFinite {
                path: self.path.clone(),
                name: key.into(),
                index,
                value: v[index],
            });
        }
        Ok(v)
    }

    fn linear(
        &self,
        path: &str,
        out: usize,
        inp: usize,
        bias: bool,
        storage: BaseStorage,
        compute: ComputeDtype,
    ) -> Result<Linear> {
        let key = format!("{path}.weight");
        let mut weight = if bnb_io::is_quantized(self.ckpt, &key) {
            let q = bnb_io::read_quantized(self.ckpt, &key)?;
            if q.shape != [out, inp] {
                return Err(Error::Shape {
                    path: self.path.clone(),
                    name: key,
                    expected: vec![out, inp],
                    got: q.shape.clone(),
                });
            }
            match storage {
                BaseStorage::Dense => BaseWeight::Dense {
                    w: q.dequantize_as_stored(),
                    out,
                    inp,
                },
                _ => BaseWeight::Quant(q),
            }
        } else {
            let w = self.dense(&key, &[out, inp])?;
            match storage {
                BaseStorage::Quantize(opts) => {
                    let dtype = match self.ckpt.get(&key)?.dtype {
                        StDtype::BF16 => Dtype::Bf16,
                        StDtype::F16 => Dtype::F16,
                        _ => Dtype::F32,
                    };
                    BaseWeight::Quant(QuantizedWeight::quantize(&w, &[out, inp], dtype, opts)?)
                }
                _ => BaseWeight::Dense { w, out, inp },
            }
        };
        weight.set_compute_dtype(compute);
        let bias = if bias {
            Some(self.dense(&format!("{path}.bias"), &[out])?)
        } else {
            None
        };
        Ok(Linear::new(weight, bias))
    }
}

/// Loads the model in `dir`.
///
/// # Errors
/// Missing files, unsupported configs, tensors whose shapes disagree with the config (each
/// naming the file and key).
pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Llama> {
    let config = LlamaConfig::load(dir)?;
    let ckpt = Checkpoint::open(dir)?;
    let model = from_checkpoint(config, &ckpt, opts)?;
    tracing::info!(
        model = %dir.display(),
        architecture = %model.config.architecture,
        layers = model.layers.len(),
        linear_mib = model.linear_weight_bytes() as f64 / (1024.0 * 1024.0),
        "loaded"
    );
    Ok(model)
}

/// Builds the model from an opened checkpoint.
///
/// # Errors
/// As [`load`].
pub fn from_checkpoint(
    config: LlamaConfig,
    ckpt: &Checkpoint,
    opts: &LoadOptions,
) -> Result<Llama> {
    let l = Loader {
        ckpt,
        path: ckpt.root().display().to_string(),
    };
    let c = &config;
    let (d, f, v) = (c.hidden_size, c.intermediate_size, c.vocab_size);
    let (q, kv) = (
        c.num_attention_heads * c.head_dim,
        c.num_key_value_heads * c.head_dim,
    );
    // each dense tensor takes its compute dtype as it is read
    let held = |w: Vec<f32>| {
        let mut w = BaseWeight::Dense { w, out: v, inp: d };
        w.set_compute_dtype(opts.compute);
        w
    };
    let embed = held(l.dense("model.embed_tokens.weight", &[v, d])?);
    let mut layers = Vec::with_capacity(c.num_hidden_layers);
    for i in 0..c.num_hidden_layers {
        let p = format!("model.layers.{i}");
        let lin = |proj: Proj, out, inp, bias| {
            l.linear(&proj.path(i), out, inp, bias, opts.storage, opts.compute)
        };
        let qk_norm = c.arch == Arch::Qwen3;
        let norm = |key: &str, n: usize| -> Result<RmsNorm> {
            Ok(RmsNorm::new(l.dense(key, &[n])?, c.rms_norm_eps))
        };
        layers.push(Block {
            input_layernorm: norm(&format!("{p}.input_layernorm.weight"), d)?,
            self_attn: Attention {
                q_proj: lin(Proj::QProj, q, d, c.qkv_bias())?,
                k_proj: lin(Proj::KProj, kv, d, c.qkv_bias())?,
                v_proj: lin(Proj::VProj, kv, d, c.qkv_bias())?,
                o_proj: lin(Proj::OProj, d, q, c.o_bias())?,
                q_norm: if qk_norm {
                    Some(norm(&format!("{p}.self_attn.q_norm.weight"), c.head_dim)?)
                } else {
                    None
                },
                k_norm: if qk_norm {
                    Some(norm(&format!("{p}.self_attn.k_norm.weight"), c.head_dim)?)
                } else {
                    None
                },
                num_heads: c.num_attention_heads,
                num_kv_heads: c.num_key_value_heads,
                head_dim: c.head_dim,
                sliding_window: c.sliding_window,
            },
            post_attention_layernorm: norm(&format!("{p}.post_attention_layernorm.weight"), d)?,
            mlp: Mlp {
                gate_proj: lin(Proj::GateProj, f, d, c.mlp_bias)?,
                up_proj: lin(Proj::UpProj, f, d, c.mlp_bias)?,
                down_proj: lin(Proj::DownProj, d, f, c.mlp_bias)?,
            },
        });
    }
    let norm = RmsNorm::new(l.dense("model.norm.weight", &[d])?, c.rms_norm_eps);
    let lm_head = if ckpt.contains("lm_head.weight") && !c.tie_word_embeddings {
        Some(held(l.dense("lm_head.weight", &[v, d])?))
    } else if c.tie_word_embeddings {
        None
    } else {
        return Err(Error::Io(io::Error::MissingTensor {
            path: ckpt.root().to_path_buf(),
            name: "lm_head.weight (tie_word_embeddings is false)".into(),
        }));
    };
    let rope_len = c.max_position_embeddings.min(4096);
    Ok(Llama::assemble(
        config, embed, layers, norm, lm_head, rope_len,
    ))
}

/// How [`save`] stores the linears.
#[derive(Debug, Clone, Copy)]
pub enum SaveAs {
    /// Dense, in this dtype.
    Dense(Dtype),
    /// bitsandbytes 4-bit (re-quantized), other tensors in f32.
    Quantized(QuantizeOptions),
}

fn dense_tensor(name: String, shape: Vec<usize>, data: &[f32], dtype: Dtype) -> OwnedTensor {
    match dtype {
        Dtype::F32 => OwnedTensor::f32(name, shape, data),
        Dtype::Bf16 => OwnedTensor {
            name,
            dtype: StDtype::BF16,
            shape,
            data: data
                .iter()
                .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                .collect(),
        },
        Dtype::F16 => OwnedTensor {
            name,
            dtype: StDtype::F16,
            shape,
            data: data
                .iter()
                .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                .collect(),
        },
    }
}

/// Writes the model (adapters must be merged or absent) as a Hugging Face checkpoint:
/// `model.safetensors` and `config.json` into `dir` (each written atomically).
///
/// # Errors
/// I/O errors; an un-merged adapter.
pub fn save(model: &Llama, dir: &Path, how: SaveAs) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| io::Error::Io {
        path: dir.into(),
        source,
    })?;
    let mut tensors = Vec::new();
    let c = &model.config;
    let dense_dtype = match how {
        SaveAs::Dense(d) => d,
        SaveAs::Quantized(_) => Dtype::F32,
    };
    let put = |tensors: &mut Vec<OwnedTensor>, name: String, shape: Vec<usize>, data: &[f32]| {
        tensors.push(dense_tensor(name, shape, data, dense_dtype));
    };
    let weight_of = |w: &BaseWeight| w.to_f32().into_owned();
    put(
        &mut tensors,
        "model.embed_tokens.weight".into(),
        vec![c.vocab_size, c.hidden_size],
        &weight_of(&model.embed_tokens),
    );
    for (i, layer) in model.layers.iter().enumerate() {
        let p = format!("model.layers.{i}");
        put(
            &mut tensors,
            format!("{p}.input_layernorm.weight"),
            vec![c.hidden_size],
            &layer.input_layernorm.weight,
        );
        put(
            &mut tensors,
            format!("{p}.post_attention_layernorm.weight"),
            vec![c.hidden_size],
            &layer.post_attention_layernorm.weight,
        );
        if let Some(n) = &layer.self_attn.q_norm {
            put(
                &mut tensors,
                format!("{p}.self_attn.q_norm.weight"),
                vec![c.head_dim],
                &n.weight,
            );
        }
        if let Some(n) = &layer.self_attn.k_norm {
            put(
                &mut tensors,
                format!("{p}.self_attn.k_norm.weight"),
                vec![c.head_dim],
                &n.weight,
            );
        }
        for proj in Proj::ALL {
            let l = layer.linear(proj);
            let path = proj.path(i);
            if l.adapter.is_some() {
                return Err(Error::Input(format!(
                    "{path} still has an adapter; merge it before saving"
                )));
            }
            let (out, inp) = (l.out_features(), l.in_features());
            match (how, &l.weight) {
                (SaveAs::Quantized(opts), w) => {
                    let q = match w {
                        BaseWeight::Quant(q)
                            if q.quant_type == opts.quant_type && q.blocksize == opts.blocksize =>
                        {
                            q.clone()
                        }
                        other => QuantizedWeight::quantize(
                            &other.to_f32(),
                            &[out, inp],
                            Dtype::F32,
                            opts,
                        )?,
                    };
                    tensors.extend(bnb_io::to_tensors(&format!("{path}.weight"), &q));
                }
                (SaveAs::Dense(_), w) => put(
                    &mut tensors,
                    format!("{path}.weight"),
                    vec![out, inp],
                    &weight_of(w),
                ),
            }
            if let Some(b) = &l.bias {
                put(&mut tensors, format!("{path}.bias"), vec![out], b);
            }
        }
    }
    put(
        &mut tensors,
        "model.norm.weight".into(),
        vec![c.hidden_size],
        &model.norm.weight,
    );
    if let Some(h) = &model.lm_head {
        put(
            &mut tensors,
            "lm_head.weight".into(),
            vec![c.vocab_size, c.hidden_size],
            &weight_of(h),
        );
    }
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    io::write_safetensors(&dir.join("model.safetensors"), &tensors, &io::pt_metadata())?;
    let mut cfg = c.raw.clone();
    if let Some(obj) = cfg.as_object_mut() {
        if model.lm_head.is_some() && c.tie_word_embeddings {
            // the head was untied (a `modules_to_save` copy): its own matrix is saved above
            obj.insert("tie_word_embeddings".into(), false.into());
        }
        match how {
            SaveAs::Dense(d) => {
                obj.remove("quantization_config");
                obj.insert("dtype".into(), d.as_str().into());
                obj.remove("torch_dtype");
            }
            SaveAs::Quantized(opts) => {
                obj.insert(
                    "quantization_config".into(),
                    bnb_io::quantization_config(&opts, Dtype::F32, None),
                );
            }
        }
    }
    let text = serde_json::to_string_pretty(&cfg).unwrap_or_default();
    io::write_text(&dir.join("config.json"), &text)?;
    Ok(())
}
