//! Training checkpoints: every trainable tensor, the AdamW moments and the step, written as
//! `checkpoint-<step>/` through a staged folder and a rename, so a crash during a save leaves
//! the previous checkpoint intact. The data order and dropout masks are functions of
//! (seed, step), so the step is all the position a resumed run needs.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::error::{Error, Result};
use super::optim::{AdamW, Moments};
use crate::io::{self, Checkpoint, OwnedTensor, StagedDir};
use crate::model::Llama;

/// `state.json` of a checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps completed.
    pub step: usize,
    /// The seed of the run (must match on resume).
    pub seed: u64,
    /// Train loss of the last step.
    pub loss: f64,
    /// Ranks of the run that wrote it (1 for one process; must match on resume, since the
    /// global batch and the micro-batch each rank computes depend on it).
    #[serde(default = "one")]
    pub world_size: usize,
}

fn one() -> usize {
    1
}

/// Name of the checkpoint folder of `step`.
pub fn dir_name(step: usize) -> String {
    format!("checkpoint-{step}")
}

/// Writes a checkpoint under `out/checkpoint-<step>` atomically and returns its path.
///
/// # Errors
/// I/O errors.
pub fn save(out: &Path, model: &Llama, opt: &AdamW, state: &TrainerState) -> Result<PathBuf> {
    let dest = out.join(dir_name(state.step));
    let staged = StagedDir::new(&dest)?;
    let params: Vec<OwnedTensor> = model
        .trainable()
        .into_iter()
        .map(|id| {
            let t = model.param(id);
            OwnedTensor::f32(id.key(), vec![t.len()], t)
        })
        .collect();
    io::write_safetensors(
        &staged.path.join("trainable.safetensors"),
        &params,
        &io::pt_metadata(),
    )?;
    let mut moments = Vec::new();
    for (id, m) in &opt.state {
        let name = id.key();
        moments.push(OwnedTensor::f32(format!("m.{name}"), vec![m.m.len()], &m.m));
        moments.push(OwnedTensor::f32(format!("v.{name}"), vec![m.v.len()], &m.v));
    }
    io::write_safetensors(
        &staged.path.join("optimizer.safetensors"),
        &moments,
        &io::pt_metadata(),
    )?;
    let json = serde_json::to_string_pretty(state).unwrap_or_default();
    io::write_text(&staged.path.join("state.json"), &json)?;
    Ok(staged.commit()?)
}

/// The newest complete checkpoint in `out`, if any.
pub fn latest(out: &Path) -> Option<PathBuf> {
    let mut best: Option<(usize, PathBuf)> = None;
    for e in std::fs::read_dir(out).ok()?.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(step) = name
            .strip_prefix("checkpoint-")
            .and_then(|s| s.parse::<usize>().ok())
        else {
            continue;
        };
        if !e.path().join("state.json").exists() {
            continue;
        }
        if best.as_ref().is_none_or(|(s, _)| step > *s) {
            best = Some((step, e.path()));
        }
    }
    best.map(|(_, p)| p)
}

/// Loads a checkpoint into the model (trainable tensors by name) and the optimizer.
///
/// # Errors
/// [`Error::Checkpoint`] when a tensor is missing or misshaped or the state is unreadable.
pub fn load(dir: &Path, model: &mut Llama, opt: &mut AdamW) -> Result<TrainerState> {
    let bad = |msg: String| Error::Checkpoint {
        path: dir.display().to_string(),
        msg,
    };
    let text = std::fs::read_to_string(dir.join("state.json"))
        .map_err(|e| bad(format!("state.json: {e}")))?;
    let state: TrainerState =
        serde_json::from_str(&text).map_err(|e| bad(format!("state.json: {e}")))?;
    let params = Checkpoint::open(&dir.join("trainable.safetensors"))?;
    let ids = model.trainable();
    let mut problems = Vec::new();
    for &id in &ids {
        let t = model.param_mut(id);
        match params.get(&id.key()).and_then(|r| r.to_f32()) {
            Ok(v) if v.len() == t.len() => t.copy_from_slice(&v),
            Ok(v) => problems.push(format!(
                "{}: {} values, model has {}",
                id.key(),
                v.len(),
                t.len()
            )),
            Err(e) => problems.push(e.to_string()),
        }
    }
    if !problems.is_empty() {
        return Err(bad(format!(
            "does not fit this model/config: {}",
            problems.join("; ")
        )));
    }
    let moments = Checkpoint::open(&dir.join("optimizer.safetensors"))?;
    opt.state.clear();
    for id in ids {
        let key = id.key();
        if !moments.contains(&format!("m.{key}")) {
            continue;
        }
        let m = moments.get(&format!("m.{key}"))?.to_f32()?;
        let v = moments.get(&format!("v.{key}"))?.to_f32()?;
        opt.state.insert(id, Moments { m, v });
    }
    opt.step = state.step as u64;
    Ok(state)
}
