//! Training: data and batching, AdamW, learning-rate schedules, checkpoints, evaluation and the
//! loop that runs all five modes (full, LoRA, QLoRA, DoRA, QDoRA) with one engine.

pub mod batch;
pub mod build;
pub mod checkpoint;
pub mod compare;
pub mod config;
pub mod data;
pub mod error;
pub mod eval;
pub mod memory;
pub mod metrics;
pub mod optim;
pub mod parquet;
pub mod plot;
pub mod schedule;
pub mod trainer;

pub use batch::Batch;
pub use build::{build_model, prepare_model, PRESET_PREFIX};
pub use config::{Mode, TrainConfig, TrainOverrides};
pub use error::{Error, Result};
pub use eval::{evaluate, evaluate_with};
pub use memory::MemoryEstimate;
pub use trainer::{train, Event, Observer, StepReport, TrainRun, TrainSummary, Trainer};
