//! Wiring PEFT adapters into a [`Llama`] by module path: create fresh adapters from a
//! [`LoraConfig`] (PEFT's `get_peft_model`), load and save PEFT adapter folders, and merge
//! adapters into the base weights.

use std::path::Path;

use super::error::{Error, Result};
use super::llama::{linear_path, Llama, LINEAR_NAMES};
use crate::adapter::peft_io::{self, AdapterFile};
use crate::adapter::{AdapterKind, BaseWeight, Bias, LoraAdapter, LoraConfig};
use crate::ops::Rng;

/// PEFT's default `target_modules` for llama / mistral / qwen2 / qwen3.
pub const DEFAULT_TARGETS: [&str; 2] = ["q_proj", "v_proj"];

fn kind(cfg: &LoraConfig) -> AdapterKind {
    if cfg.use_dora {
        AdapterKind::Dora
    } else {
        AdapterKind::Lora
    }
}

fn check_modules_to_save(cfg: &LoraConfig) -> Result<(bool, bool)> {
    let mut embed = false;
    let mut head = false;
    for m in cfg.modules_to_save.iter().flatten() {
        match m.as_str() {
            "embed_tokens" | "model.embed_tokens" => embed = true,
            "lm_head" => head = true,
            other => {
                return Err(Error::Adapter(crate::adapter::Error::Config {
                    path: "<adapter config>".into(),
                    field: "modules_to_save".into(),
                    msg: format!("{other:?} is not supported (supported: embed_tokens, lm_head)"),
                }))
            }
        }
    }
    Ok((embed, head))
}

/// Adds adapters to every targeted linear (fresh weights, PEFT's initialisation) and sets which
/// biases and modules train. Returns the number of adapted modules.
///
/// # Errors
/// A config that targets nothing, a rank larger than a layer, or unsupported modules_to_save.
pub fn attach(model: &mut Llama, cfg: &LoraConfig, rng: &mut Rng) -> Result<usize> {
    let init = cfg.init().map_err(|msg| crate::adapter::Error::Config {
        path: "<adapter config>".into(),
        field: "init_lora_weights".into(),
        msg,
    })?;
    wire(model, cfg, &mut |path, base, r, scaling| {
        if r > base.out_features().min(base.in_features()) {
            return Err(Error::Adapter(crate::adapter::Error::Invalid {
                module: path.into(),
                msg: format!(
                    "rank {r} exceeds min(in, out) = {} of this layer",
                    base.out_features().min(base.in_features())
                ),
            }));
        }
        Ok(Some(LoraAdapter::new(
            base,
            kind(cfg),
            r,
            scaling,
            cfg.lora_dropout as f32,
            init,
            rng,
        )))
    })
}

/// Builds the adapter of one module: (path, base, rank, scaling) → adapter.
type MakeAdapter<'a> = dyn FnMut(&str, &BaseWeight, usize, f32) -> Result<Option<LoraAdapter>> + 'a;

/// Shared by attach and load: walks the targeted linears, builds each adapter with `make`,
/// and applies `bias` / `modules_to_save`.
fn wire(model: &mut Llama, cfg: &LoraConfig, make: &mut MakeAdapter<'_>) -> Result<usize> {
    let (embed, head) = check_modules_to_save(cfg)?;
    let mut n = 0;
    for i in 0..model.layers.len() {
        for name in LINEAR_NAMES {
            let path = linear_path(i, name);
            let targeted = cfg.is_target(&path, false, &DEFAULT_TARGETS);
            let l = model.layers[i].linear_mut(name);
            if targeted {
                let res = cfg.resolve(&path);
                l.adapter = make(&path, &l.weight, res.r, res.scaling)?;
                n += 1;
            }
            l.train_bias = l.bias.is_some()
                && match cfg.bias {
                    Bias::None => false,
                    Bias::All => true,
                    Bias::LoraOnly => targeted,
                };
        }
    }
    if n == 0 {
        return Err(Error::Adapter(crate::adapter::Error::Config {
            path: "<adapter config>".into(),
            field: "target_modules".into(),
            msg: format!(
                "{:?} matches no linear layer of this model",
                cfg.target_modules
            ),
        }));
    }
    model.train_embed_tokens = embed;
    model.train_lm_head = head;
    // PEFT wraps a module of `modules_to_save` in a copy that trains (and is saved) alone; on a
    // model whose head is tied to its embedding the other side of the tie keeps the base
    // matrix. With `ensure_weight_tying` one shared copy trains for both sides (gradients of
    // the embedding and of the head) and is saved under both keys.
    let keep_tied = cfg
        .extra
        .get("ensure_weight_tying")
        .and_then(serde_json::Value::as_bool)
        .unwrap_or(false);
    if (embed || head) && model.lm_head.is_none() {
        if keep_tied {
            model.train_embed_tokens = true;
            model.train_lm_head = true;
        } else {
            model.lm_head = Some(model.embed_tokens.clone());
        }
    }
    Ok(n)
}

/// Key of a trainable bias in the adapter file (PEFT wraps targeted layers: `base_layer.bias`).
fn bias_key(path: &str, targeted: bool) -> String {
    if targeted {
        format!("{path}.base_layer.bias")
    } else {
        format!("{path}.bias")
    }
}

/// Loads a PEFT adapter folder into `model` (training or inference). Every tensor of the file
/// must be used and every expected tensor present with the right shape.
///
/// # Errors
/// [`crate::adapter::Error::Mismatch`] listing all problems; config errors.
pub fn load_adapter(model: &mut Llama, dir: &Path) -> Result<LoraConfig> {
    let cfg = LoraConfig::load(dir)?;
    let mut file = AdapterFile::open(dir)?;
    let dropout = cfg.lora_dropout as f32;
    let k = kind(&cfg);
    wire(model, &cfg, &mut |path, base, r, scaling| {
        let (out, inp) = (base.out_features(), base.in_features());
        Ok(file
            .take_module(path, r, out, inp, k == AdapterKind::Dora)
            .map(|(a, b, m)| LoraAdapter::from_weights(base, a, b, m, r, scaling, dropout, k)))
    })?;
    // Biases and modules_to_save tensors.
    for i in 0..model.layers.len() {
        for name in LINEAR_NAMES {
            let path = linear_path(i, name);
            let l = model.layers[i].linear_mut(name);
            if l.train_bias {
                let key = bias_key(&path, l.adapter.is_some());
                let len = l.out_features();
                if let Some(b) = file.take_param(&key, &[len]) {
                    l.bias = Some(b);
                }
            }
        }
    }
    let (v, d) = (model.config.vocab_size, model.config.hidden_size);
    if model.train_embed_tokens {
        if let Some(w) = file.take_param("model.embed_tokens.weight", &[v, d]) {
            model.embed_tokens = BaseWeight::Dense { w, out: v, inp: d };
        }
    }
    if model.train_lm_head {
        if let Some(w) = file.take_param("lm_head.weight", &[v, d]) {
            if model.lm_head.is_some() {
                model.lm_head = Some(BaseWeight::Dense { w, out: v, inp: d });
            } else {
                model.embed_tokens = BaseWeight::Dense { w, out: v, inp: d };
            }
        }
    }
    file.finish()?;
    Ok(cfg)
}

/// Saves the model's adapters (and trainable biases / modules_to_save) as a PEFT folder.
///
/// # Errors
/// I/O errors.
pub fn save_adapter(model: &Llama, dir: &Path, cfg: &LoraConfig) -> Result<()> {
    let mut adapters = Vec::new();
    let mut params: Vec<(String, Vec<usize>, &[f32])> = Vec::new();
    for (i, layer) in model.layers.iter().enumerate() {
        for name in LINEAR_NAMES {
            let path = linear_path(i, name);
            let l = layer.linear(name);
            if let Some(a) = &l.adapter {
                adapters.push((path.clone(), a));
            }
            if l.train_bias {
                if let Some(b) = &l.bias {
                    params.push((bias_key(&path, l.adapter.is_some()), vec![b.len()], b));
                }
            }
        }
    }
    let (v, d) = (model.config.vocab_size, model.config.hidden_size);
    if model.train_embed_tokens {
        if let BaseWeight::Dense { w, .. } = &model.embed_tokens {
            params.push(("model.embed_tokens.weight".into(), vec![v, d], w));
        }
    }
    if model.train_lm_head {
        if let BaseWeight::Dense { w, .. } = model.head() {
            params.push(("lm_head.weight".into(), vec![v, d], w));
        }
    }
    peft_io::save(dir, cfg, &adapters, &params)?;
    Ok(())
}

/// Folds every adapter into its base weight (dense f32 result) and removes it.
pub fn merge(model: &mut Llama) {
    for layer in &mut model.layers {
        for name in LINEAR_NAMES {
            let l = layer.linear_mut(name);
            if let Some(a) = l.adapter.take() {
                let (out, inp) = (l.out_features(), l.in_features());
                let w = crate::adapter::merge::merged_weight(&l.weight, &a);
                l.weight = BaseWeight::Dense { w, out, inp };
            }
        }
    }
}
