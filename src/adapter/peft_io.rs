//! PEFT's adapter files (spec §4): `adapter_model.safetensors` with keys
//! `base_model.model.<module>.lora_A.weight`, `.lora_B.weight`, `.lora_magnitude_vector` (also
//! accepting `.lora_magnitude_vector.weight`), trainable biases and `modules_to_save` tensors under
//! `base_model.model.<param>`, plus `adapter_config.json`. Saved atomically. Loading checks every
//! key and shape and refuses an adapter that does not fit, listing all problems (PEFT only warns).

use std::collections::BTreeMap;
use std::path::Path;

use super::config::LoraConfig;
use super::error::{Error, Result};
use super::lora::{AdapterParam, AdapterWeights, LoraAdapter};
use crate::io::{self, Checkpoint, OwnedTensor};

/// Prefix PEFT puts before module paths in adapter files.
pub const PREFIX: &str = "base_model.model.";

/// Key of an adapter tensor of a module path (the DoRA magnitude without `.weight`, as PEFT
/// writes it).
pub fn key(module: &str, p: AdapterParam) -> String {
    match p {
        AdapterParam::LoraA => format!("{PREFIX}{module}.lora_A.weight"),
        AdapterParam::LoraB => format!("{PREFIX}{module}.lora_B.weight"),
        AdapterParam::Magnitude => format!("{PREFIX}{module}.lora_magnitude_vector"),
    }
}

/// The stored shape of an adapter tensor: `lora_A` (R, in), `lora_B` (out, R), `m` (out).
fn shape(r: usize, out: usize, inp: usize, p: AdapterParam) -> Vec<usize> {
    match p {
        AdapterParam::LoraA => vec![r, inp],
        AdapterParam::LoraB => vec![out, r],
        AdapterParam::Magnitude => vec![out],
    }
}
/// Key of a full parameter (bias, modules_to_save weight) by its model key.
pub fn key_param(param: &str) -> String {
    format!("{PREFIX}{param}")
}

/// Writes `adapter_config.json` and `adapter_model.safetensors` into `dir` (created if needed),
/// each file atomically. `params` are extra full tensors by model key (trainable biases,
/// `modules_to_save` weights) with their shapes.
///
/// # Errors
/// I/O errors naming the file.
pub fn save(
    dir: &Path,
    config: &LoraConfig,
    adapters: &[(String, &LoraAdapter)],
    params: &[(String, Vec<usize>, &[f32])],
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| io::Error::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut tensors = Vec::new();
    for (module, a) in adapters {
        for &p in a.params() {
            if let Some(data) = a.param(p) {
                let shape = shape(a.r(), a.out_features(), a.in_features(), p);
                tensors.push(OwnedTensor::f32(key(module, p), shape, data));
            }
        }
    }
    for (name, shape, data) in params {
        tensors.push(OwnedTensor::f32(key_param(name), shape.clone(), data));
    }
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    io::write_safetensors(
        &dir.join("adapter_model.safetensors"),
        &tensors,
        &io::pt_metadata(),
    )?;
    io::write_text(&dir.join("adapter_config.json"), &config.to_json())?;
    Ok(())
}

/// The tensors of an adapter file, taken out one module at a time by the model while it wraps
/// its layers; [`finish`](Self::finish) then reports everything that did not fit.
pub struct AdapterFile {
    path: String,
    tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    problems: Vec<String>,
}

impl AdapterFile {
    /// Reads `<dir>/adapter_model.safetensors`, normalising `lora_magnitude_vector.weight` keys.
    ///
    /// # Errors
    /// I/O and format errors naming the file; non-float tensors.
    pub fn open(dir: &Path) -> Result<Self> {
        let path = dir.join("adapter_model.safetensors");
        if !path.exists() && dir.join("adapter_model.bin").exists() {
            return Err(Error::Config {
                path: dir.join("adapter_model.bin").display().to_string(),
                field: "<file>".into(),
                msg:
                    "pickled adapter_model.bin is not supported; save with safe_serialization=True"
                        .into(),
            });
        }
        let ckpt = Checkpoint::open(&path)?;
        let mut tensors = BTreeMap::new();
        for k in ckpt.keys() {
            let t = ckpt.get(k)?;
            let data = t.to_f32()?;
            let key = k
                .strip_suffix(".lora_magnitude_vector.weight")
                .map(|p| format!("{p}.lora_magnitude_vector"))
                .unwrap_or_else(|| k.to_string());
            tensors.insert(key, (t.shape.clone(), data));
        }
        Ok(Self {
            path: path.display().to_string(),
            tensors,
            problems: Vec::new(),
        })
    }

    fn take(&mut self, key: &str, shape: &[usize]) -> Option<Vec<f32>> {
        match self.tensors.remove(key) {
            None => {
                self.problems
                    .push(format!("missing {key} (expected shape {shape:?})"));
                None
            }
            Some((s, _)) if s != shape => {
                self.problems
                    .push(format!("{key}: shape {s:?}, expected {shape:?}"));
                None
            }
            Some((_, d)) => Some(d),
        }
    }

    /// Takes A, B (and m when `dora`) of `module`, checking shapes against `r`, `out`, `inp`.
    /// Returns `None` (and records the problem) when something is missing or misshaped.
    pub fn take_module(
        &mut self,
        module: &str,
        (r, out, inp): (usize, usize, usize),
        dora: bool,
    ) -> Option<AdapterWeights> {
        let mut take = |p| self.take(&key(module, p), &shape(r, out, inp, p));
        let a = take(AdapterParam::LoraA);
        let b = take(AdapterParam::LoraB);
        let m = dora.then(|| take(AdapterParam::Magnitude));
        match (a, b, m) {
            (Some(lora_a), Some(lora_b), None) => Some(AdapterWeights {
                lora_a,
                lora_b,
                magnitude: None,
            }),
            (Some(lora_a), Some(lora_b), Some(Some(m))) => Some(AdapterWeights {
                lora_a,
                lora_b,
                magnitude: Some(m),
            }),
            _ => None,
        }
    }

    /// Takes a full parameter (bias or modules_to_save weight) by its model key.
    pub fn take_param(&mut self, param: &str, shape: &[usize]) -> Option<Vec<f32>> {
        self.take(&key_param(param), shape)
    }

    /// Whether the file has a tensor for this model parameter key.
    pub fn has_param(&self, param: &str) -> bool {
        self.tensors.contains_key(&key_param(param))
    }

    /// Fails with every missing, misshaped and unexpected tensor if any.
    ///
    /// # Errors
    /// [`Error::Mismatch`].
    pub fn finish(mut self) -> Result<()> {
        for k in self.tensors.keys() {
            self.problems.push(format!(
                "unexpected {k} (no such adapted module in the model)"
            ));
        }
        if self.problems.is_empty() {
            Ok(())
        } else {
            Err(Error::Mismatch {
                path: self.path,
                problems: self.problems,
            })
        }
    }
}
