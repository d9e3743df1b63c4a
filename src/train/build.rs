//! The model a training mode trains: loaded (or a random-initialised preset), its base stored
//! as the mode says (dense, or quantized to 4-bit while loading), and made trainable (every
//! weight for full fine-tuning, fresh PEFT adapters otherwise).

use std::path::Path;

use super::config::{Mode, TrainConfig};
use super::error::{Error, Result};
use crate::adapter::{BaseWeight, LoraConfig};
use crate::model::{adapters, load, random, BaseStorage, Llama, LoadOptions, Proj};
use crate::ops::bf16::ComputeDtype;
use crate::ops::Rng;

/// Prefix of a model "path" that names a random-initialised preset (`preset:llama-tiny-512`).
pub const PRESET_PREFIX: &str = "preset:";

/// Loads the model for `cfg.mode` (a folder, or `preset:<name>` for random weights) and makes
/// its trainable parts trainable; returns the PEFT config for adapter modes.
///
/// # Errors
/// Model loading and adapter errors; an unknown preset.
pub fn build_model(model_dir: &Path, cfg: &TrainConfig) -> Result<(Llama, Option<LoraConfig>)> {
    let quantize = cfg.mode.quantized().then(|| cfg.quantize_options());
    let preset = model_dir
        .to_str()
        .and_then(|s| s.strip_prefix(PRESET_PREFIX));
    let mut model = match preset {
        Some(name) => {
            let c = random::preset(name).ok_or_else(|| {
                Error::Settings(vec![format!(
                    "unknown preset {name:?} (known: {})",
                    random::PRESETS.join(", ")
                )])
            })?;
            random::random_model(c, quantize, cfg.seed, frozen_compute(cfg))
        }
        None => {
            let storage = match quantize {
                Some(o) => BaseStorage::Quantize(o),
                None => BaseStorage::Dense,
            };
            // frozen weights are stored for their compute dtype as they are read
            let compute = frozen_compute(cfg);
            load(model_dir, &LoadOptions { storage, compute })?
        }
    };
    let lora = prepare_model(&mut model, cfg, &model_dir.display().to_string())?;
    Ok((model, lora))
}

/// What the base's weights compute in before anything trains: f32 for full fine-tuning (every
/// weight trains), the resolved `compute_dtype` otherwise.
pub fn frozen_compute(cfg: &TrainConfig) -> ComputeDtype {
    match cfg.mode {
        Mode::Full => ComputeDtype::F32,
        _ => cfg.compute_dtype.resolve(),
    }
}

/// Makes a loaded model trainable for `cfg.mode` (adapters, or every weight for full).
///
/// # Errors
/// Adapter configuration errors.
pub fn prepare_model(
    model: &mut Llama,
    cfg: &TrainConfig,
    base_name: &str,
) -> Result<Option<LoraConfig>> {
    if cfg.mode == Mode::Full {
        // every weight trains, and trained weights compute in f32
        model.train_embed_tokens = true;
        model.train_lm_head = true;
        model.norm.train = true;
        for layer in &mut model.layers {
            layer.input_layernorm.train = true;
            layer.post_attention_layernorm.train = true;
            for n in [&mut layer.self_attn.q_norm, &mut layer.self_attn.k_norm]
                .into_iter()
                .flatten()
            {
                n.train = true;
            }
            for p in Proj::ALL {
                let l = layer.linear_mut(p);
                l.train_weight = matches!(l.weight, BaseWeight::Dense { .. });
                l.train_bias = l.bias.is_some();
            }
        }
        return Ok(None);
    }
    // frozen weights take the compute dtype before adapters see them (DoRA's magnitude)
    model.set_compute_dtype(cfg.compute_dtype.resolve());
    let lcfg = cfg.lora_config(base_name);
    lcfg.validate("<train config>")?;
    let mut rng = Rng::new(cfg.seed).fork(7);
    adapters::attach(model, &lcfg, cfg.dora_dropout, &mut rng)?;
    Ok(Some(lcfg))
}
