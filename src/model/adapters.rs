//! Wiring PEFT adapters into a [`Llama`] by module path: create fresh adapters from a
//! [`LoraConfig`] (PEFT's `get_peft_model`), load and save PEFT adapter folders, and merge
//! adapters into the base weights.

use std::path::Path;

use super::error::{Error, Result};
use super::llama::Llama;
use super::params::{ParamId, Proj};
use crate::adapter::peft_io::{self, AdapterFile};
use crate::adapter::{
    AdapterKind, AdapterOptions, BaseWeight, Bias, DoraDropout, LoraAdapter, LoraConfig,
};
use crate::ops::bf16::ComputeDtype;
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

/// The options of one module's adapter under `cfg` (rank and scaling resolved by the caller).
fn options(cfg: &LoraConfig, r: usize, scaling: f32, dora_dropout: DoraDropout) -> AdapterOptions {
    AdapterOptions {
        kind: kind(cfg),
        r,
        scaling,
        dropout: cfg.lora_dropout as f32,
        dora_dropout,
    }
}

/// Adds adapters to every targeted linear (fresh weights, PEFT's initialisation) and sets which
/// biases and modules train; DoRA adapters apply their training dropout as `dora_dropout`
/// says. Returns the number of adapted modules.
///
/// # Errors
/// A config that targets nothing, a rank larger than a layer, or unsupported modules_to_save.
pub fn attach(
    model: &mut Llama,
    cfg: &LoraConfig,
    dora_dropout: DoraDropout,
    rng: &mut Rng,
) -> Result<usize> {
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
        let opts = options(cfg, r, scaling, dora_dropout);
        Ok(Some(LoraAdapter::new(base, &opts, init, rng)))
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
        for proj in Proj::ALL {
            let path = proj.path(i);
            let targeted = cfg.is_target(&path, false, &DEFAULT_TARGETS);
            let l = model.layers[i].linear_mut(proj);
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
    // A module that trains computes in f32 (a bf16-compute model stored it in bf16: widened
    // exactly, so it starts from the values the frozen model used).
    if model.train_embed_tokens {
        model.embed_tokens.set_compute_dtype(ComputeDtype::F32);
    }
    if model.train_lm_head {
        if let Some(h) = model.lm_head.as_mut() {
            h.set_compute_dtype(ComputeDtype::F32);
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
    let dora = kind(&cfg) == AdapterKind::Dora;
    let modules = wire(model, &cfg, &mut |path, base, r, scaling| {
        let shape = (r, base.out_features(), base.in_features());
        let opts = options(&cfg, r, scaling, DoraDropout::default());
        Ok(file
            .take_module(path, shape, dora)
            .map(|w| LoraAdapter::from_weights(base, &opts, w)))
    })?;
    // Biases and modules_to_save tensors.
    for i in 0..model.layers.len() {
        for proj in Proj::ALL {
            let path = proj.path(i);
            let l = model.layers[i].linear_mut(proj);
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
    tracing::info!(adapter = %dir.display(), modules, dora, "adapter loaded");
    Ok(cfg)
}

/// Saves the model's adapters (and trainable biases / modules_to_save) as a PEFT folder: the
/// model's trainable tensors, under PEFT's keys. A head tied to the embedding that trains with
/// it (`ensure_weight_tying`) is saved under both keys, as PEFT does.
///
/// # Errors
/// I/O errors.
pub fn save_adapter(model: &Llama, dir: &Path, cfg: &LoraConfig) -> Result<()> {
    let mut adapters = Vec::new();
    let mut params: Vec<(String, Vec<usize>, &[f32])> = Vec::new();
    let (v, d) = (model.config.vocab_size, model.config.hidden_size);
    for id in model.trainable() {
        match id {
            ParamId::Adapter(i, p, _) => {
                // an adapter's tensors come one after the other: take the adapter once
                let path = p.path(i);
                if adapters.last().is_none_or(|(m, _)| *m != path) {
                    let a = model.layers[i].linear(p).adapter.as_ref();
                    adapters.push((path, a.expect("an adapter tensor belongs to an adapter")));
                }
            }
            ParamId::Bias(i, p) => {
                let l = model.layers[i].linear(p);
                let key = bias_key(&p.path(i), l.adapter.is_some());
                params.push((key, vec![l.out_features()], model.param(id)));
            }
            ParamId::EmbedTokens | ParamId::LmHead => {
                params.push((id.key(), vec![v, d], model.param(id)));
            }
            _ => {}
        }
    }
    if model.lm_head.is_none() && model.train_embed_tokens && model.train_lm_head {
        params.push((
            "lm_head.weight".into(),
            vec![v, d],
            model.param(ParamId::EmbedTokens),
        ));
    }
    peft_io::save(dir, cfg, &adapters, &params)?;
    Ok(())
}

/// Folds every adapter into its base weight (dense f32 result) and removes it.
pub fn merge(model: &mut Llama) {
    for layer in &mut model.layers {
        for proj in Proj::ALL {
            let l = layer.linear_mut(proj);
            if let Some(a) = l.adapter.take() {
                let (out, inp) = (l.out_features(), l.in_features());
                let w = crate::adapter::merge::merged_weight(&l.weight, &a);
                l.weight = BaseWeight::Dense { w, out, inp };
            }
        }
    }
}
