//! Training: data and batching, AdamW, learning-rate schedules, checkpoints, evaluation and the
//! loop that runs all five modes (full, LoRA, QLoRA, DoRA, QDoRA) with one engine.

pub mod checkpoint;
pub mod compare;
pub mod config;
pub mod data;
pub mod error;
pub mod optim;
pub mod plot;
pub mod schedule;
pub mod trainer;

pub use config::{Mode, TrainConfig};
pub use error::{Error, Result};
pub use trainer::{train, Event, Observer, TrainRun, TrainSummary};
