//! bitsandbytes 4-bit tensors in Hugging Face checkpoints (spec §5.5, §6.2–6.3): reading a
//! quantized Linear weight (`weight`, `weight.absmax`, `weight.quant_map`, `weight.nested_absmax`,
//! `weight.nested_quant_map`, `weight.quant_state.bitsandbytes__nf4|fp4`), writing one, the
//! `quantization_config` of `config.json`, and quantizing a whole checkpoint as a stream.

use std::path::Path;

use serde_json::{json, Value};

use super::blockwise::{Absmax, QuantType};
use super::error::{Error, Result};
use super::weight::{Dtype, Parts, QuantizeOptions, QuantizedWeight};
use crate::io::{self, Checkpoint, OwnedTensor, StDtype};

/// The quant-state key of `weight_key` for a quant type.
fn state_key(weight_key: &str, qt: QuantType) -> String {
    format!("{weight_key}.quant_state.bitsandbytes__{}", qt.as_str())
}

/// Whether `weight_key` is stored 4-bit in `ckpt`.
pub fn is_quantized(ckpt: &Checkpoint, weight_key: &str) -> bool {
    [QuantType::Nf4, QuantType::Fp4]
        .iter()
        .any(|&qt| ckpt.contains(&state_key(weight_key, qt)))
}

/// Whether a key is one of the auxiliary tensors of a quantized weight (not a weight itself).
pub fn is_quant_aux_key(key: &str) -> bool {
    [
        ".weight.absmax",
        ".weight.quant_map",
        ".weight.nested_absmax",
        ".weight.nested_quant_map",
    ]
    .iter()
    .any(|s| key.ends_with(s))
        || key.contains(".weight.quant_state.bitsandbytes__")
}

fn f32_vec(ckpt: &Checkpoint, name: &str, weight_key: &str, what: &str) -> Result<Vec<f32>> {
    let t = ckpt.get(name).map_err(|_| Error::Missing {
        name: weight_key.to_string(),
        what: what.to_string(),
    })?;
    if t.dtype != StDtype::F32 {
        return Err(Error::Inconsistent {
            name: weight_key.to_string(),
            problem: format!("{what} has dtype {:?}, expected F32", t.dtype),
        });
    }
    Ok(t.to_f32()?)
}

/// Reads the 4-bit weight `weight_key` (e.g. `model.layers.0.self_attn.q_proj.weight`).
///
/// # Errors
/// [`Error::Missing`] when a part is absent, [`Error::BadQuantState`] for malformed JSON,
/// [`Error::Inconsistent`] when the parts disagree (each naming the weight).
pub fn read_quantized(ckpt: &Checkpoint, weight_key: &str) -> Result<QuantizedWeight> {
    let qt = [QuantType::Nf4, QuantType::Fp4]
        .into_iter()
        .find(|&qt| ckpt.contains(&state_key(weight_key, qt)))
        .ok_or_else(|| Error::Missing {
            name: weight_key.to_string(),
            what: "weight.quant_state.bitsandbytes__nf4|fp4".into(),
        })?;
    let bad_state = |msg: String| Error::BadQuantState {
        name: weight_key.to_string(),
        msg,
    };
    let state_raw = ckpt.get(&state_key(weight_key, qt))?;
    let state: Value =
        serde_json::from_slice(state_raw.data).map_err(|e| bad_state(e.to_string()))?;
    let field = |k: &str| state.get(k).ok_or_else(|| bad_state(format!("no \"{k}\"")));
    let json_qt = field("quant_type")?
        .as_str()
        .ok_or_else(|| bad_state("quant_type is not a string".into()))?;
    let json_qt = QuantType::parse(json_qt)?;
    if json_qt != qt {
        return Err(bad_state(format!(
            "quant_type {} disagrees with key suffix {}",
            json_qt.as_str(),
            qt.as_str()
        )));
    }
    let blocksize = field("blocksize")?
        .as_u64()
        .ok_or_else(|| bad_state("blocksize is not an integer".into()))?
        as usize;
    let dtype = Dtype::parse(
        field("dtype")?
            .as_str()
            .ok_or_else(|| bad_state("dtype is not a string".into()))?,
    )?;
    let shape: Vec<usize> = field("shape")?
        .as_array()
        .ok_or_else(|| bad_state("shape is not a list".into()))?
        .iter()
        .map(|d| d.as_u64().map(|d| d as usize))
        .collect::<Option<_>>()
        .ok_or_else(|| bad_state("shape has a non-integer entry".into()))?;
    let packed_t = ckpt.get(weight_key)?;
    // The packed bytes are the raw storage, whatever dtype `quant_storage` gave them.
    let packed = packed_t.data.to_vec();
    let absmax_key = format!("{weight_key}.absmax");
    let absmax_t = ckpt.get(&absmax_key).map_err(|_| Error::Missing {
        name: weight_key.to_string(),
        what: "weight.absmax".into(),
    })?;
    let nested = state.get("nested_offset").is_some();
    let absmax = if nested {
        if absmax_t.dtype != StDtype::U8 {
            return Err(Error::Inconsistent {
                name: weight_key.to_string(),
                problem: format!(
                    "double-quantized absmax has dtype {:?}, expected U8",
                    absmax_t.dtype
                ),
            });
        }
        let offset = field("nested_offset")?
            .as_f64()
            .ok_or_else(|| bad_state("nested_offset is not a number".into()))?
            as f32;
        if let Some(nb) = state.get("nested_blocksize") {
            if nb.as_u64() != Some(256) {
                return Err(bad_state(format!("nested_blocksize {nb} is not 256")));
            }
        }
        Absmax::Nested {
            qabsmax: absmax_t.data.to_vec(),
            nested_absmax: f32_vec(
                ckpt,
                &format!("{weight_key}.nested_absmax"),
                weight_key,
                "weight.nested_absmax",
            )?,
            nested_quant_map: f32_vec(
                ckpt,
                &format!("{weight_key}.nested_quant_map"),
                weight_key,
                "weight.nested_quant_map",
            )?,
            offset,
        }
    } else {
        Absmax::Plain(f32_vec(ckpt, &absmax_key, weight_key, "weight.absmax")?)
    };
    let quant_map = match ckpt.get(&format!("{weight_key}.quant_map")) {
        Ok(_) => {
            let v = f32_vec(
                ckpt,
                &format!("{weight_key}.quant_map"),
                weight_key,
                "weight.quant_map",
            )?;
            <[f32; 16]>::try_from(v.as_slice()).map_err(|_| Error::Inconsistent {
                name: weight_key.to_string(),
                problem: format!("quant_map has {} entries, expected 16", v.len()),
            })?
        }
        Err(_) => qt.code(),
    };
    QuantizedWeight::from_parts(
        weight_key,
        Parts {
            packed,
            quant_type: qt,
            blocksize,
            dtype,
            shape,
            absmax,
            quant_map,
        },
    )
}

/// The checkpoint tensors of a quantized weight, in the order transformers writes them.
pub fn to_tensors(weight_key: &str, w: &QuantizedWeight) -> Vec<OwnedTensor> {
    let mut out = vec![OwnedTensor::u8(
        weight_key,
        vec![w.packed.len(), 1],
        w.packed.clone(),
    )];
    match &w.absmax {
        Absmax::Plain(a) => out.push(OwnedTensor::f32(
            format!("{weight_key}.absmax"),
            vec![a.len()],
            a,
        )),
        Absmax::Nested {
            qabsmax,
            nested_absmax,
            nested_quant_map,
            ..
        } => {
            out.push(OwnedTensor::u8(
                format!("{weight_key}.absmax"),
                vec![qabsmax.len()],
                qabsmax.clone(),
            ));
            out.push(OwnedTensor::f32(
                format!("{weight_key}.nested_absmax"),
                vec![nested_absmax.len()],
                nested_absmax,
            ));
            out.push(OwnedTensor::f32(
                format!("{weight_key}.nested_quant_map"),
                vec![nested_quant_map.len()],
                nested_quant_map,
            ));
        }
    }
    out.push(OwnedTensor::f32(
        format!("{weight_key}.quant_map"),
        vec![16],
        &w.quant_map,
    ));
    let json = w.quant_state_json().into_bytes();
    out.push(OwnedTensor::u8(
        state_key(weight_key, w.quant_type),
        vec![json.len()],
        json,
    ));
    out
}

/// The `quantization_config` transformers writes into `config.json` for these options.
pub fn quantization_config(
    opts: &QuantizeOptions,
    compute_dtype: Dtype,
    skip_modules: Option<&[String]>,
) -> Value {
    json!({
        "_load_in_4bit": true,
        "_load_in_8bit": false,
        "bnb_4bit_compute_dtype": compute_dtype.as_str(),
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": opts.quant_type.as_str(),
        "bnb_4bit_use_double_quant": opts.double_quant,
        "llm_int8_enable_fp32_cpu_offload": false,
        "llm_int8_has_fp16_weight": false,
        "llm_int8_skip_modules": skip_modules,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": true,
        "load_in_8bit": false,
        "quant_method": "bitsandbytes"
    })
}

/// Quantizes every tensor for which `quantize_key(name, shape)` is true and copies the others,
/// streaming one tensor at a time into `dest` (a safetensors file written atomically).
/// `progress(done, total, name)` is called after each tensor.
///
/// # Errors
/// Any read or write error, naming the file and tensor.
pub fn quantize_checkpoint(
    src: &Checkpoint,
    dest: &Path,
    opts: QuantizeOptions,
    quantize_key: &dyn Fn(&str, &[usize]) -> bool,
    progress: &mut dyn FnMut(usize, usize, &str),
) -> Result<()> {
    // Plan: sizes of every output tensor are known from shapes alone.
    let keys: Vec<String> = src.keys().map(String::from).collect();
    let mut plan = Vec::new();
    for k in &keys {
        let t = src.get(k)?;
        if quantize_key(k, &t.shape) {
            let n = t.numel();
            let nblocks = n.div_ceil(opts.blocksize);
            plan.push((k.clone(), StDtype::U8, vec![n.div_ceil(2), 1]));
            if opts.double_quant {
                plan.push((format!("{k}.absmax"), StDtype::U8, vec![nblocks]));
                plan.push((
                    format!("{k}.nested_absmax"),
                    StDtype::F32,
                    vec![nblocks.div_ceil(256)],
                ));
                plan.push((format!("{k}.nested_quant_map"), StDtype::F32, vec![256]));
            } else {
                plan.push((format!("{k}.absmax"), StDtype::F32, vec![nblocks]));
            }
            plan.push((format!("{k}.quant_map"), StDtype::F32, vec![16]));
            // JSON length depends on the offset's digits: computed when quantized, so
            // quantized tensors are processed in a first pass below.
        } else {
            plan.push((k.clone(), t.dtype, t.shape.clone()));
        }
    }
    // First pass: quantize each weight once to learn its JSON length, keeping only the JSON.
    // (Quantizing twice costs CPU, not memory; the JSON length varies with nested_offset.)
    let mut jsons = std::collections::HashMap::new();
    for k in &keys {
        let t = src.get(k)?;
        if quantize_key(k, &t.shape) {
            let w = quantize_raw(&t, opts)?;
            jsons.insert(k.clone(), w.quant_state_json());
        }
    }
    let mut full_plan = Vec::new();
    for (name, dt, shape) in plan {
        let is_qmap = name.ends_with(".quant_map") && !name.ends_with(".nested_quant_map");
        full_plan.push((name.clone(), dt, shape));
        if is_qmap {
            let wk = name.trim_end_matches(".quant_map");
            if let Some(js) = jsons.get(wk) {
                full_plan.push((state_key(wk, opts.quant_type), StDtype::U8, vec![js.len()]));
            }
        }
    }
    let mut w = io::StreamingWriter::create(dest, &full_plan, &io::pt_metadata())?;
    let total = keys.len();
    for (i, k) in keys.iter().enumerate() {
        let t = src.get(k)?;
        if quantize_key(k, &t.shape) {
            let q = quantize_raw(&t, opts)?;
            for ot in to_tensors(k, &q) {
                w.write(&ot.name, &ot.data)?;
            }
        } else {
            w.write(k, t.data)?;
        }
        progress(i + 1, total, k);
    }
    w.finish()?;
    Ok(())
}

fn quantize_raw(t: &io::RawTensor<'_>, opts: QuantizeOptions) -> Result<QuantizedWeight> {
    let dtype = match t.dtype {
        StDtype::F32 => Dtype::F32,
        StDtype::BF16 => Dtype::Bf16,
        StDtype::F16 => Dtype::F16,
        other => {
            return Err(Error::Inconsistent {
                name: t.name.to_string(),
                problem: format!("cannot quantize dtype {other:?}"),
            })
        }
    };
    let data = t.to_f32()?;
    QuantizedWeight::quantize(&data, &t.shape, dtype, opts)
}
