//! Errors of the `train` module: bad data, bad settings, numerical failure, interrupted runs.

/// What can stop a training run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Occurs when a dataset record cannot be parsed or used; names file and line.
    #[error("{path}:{line}: {msg}")]
    Data {
        /// The data file.
        path: String,
        /// 1-based line (JSONL/TXT) or record index (JSON array).
        line: usize,
        /// What is wrong.
        msg: String,
    },
    /// Occurs when a dataset is unusable as a whole (empty, unknown format).
    #[error("{path}: {msg}")]
    Dataset {
        /// The data file.
        path: String,
        /// What is wrong.
        msg: String,
    },
    /// Occurs when training settings are invalid; lists every problem.
    #[error("invalid training settings:\n  {}", .0.join("\n  "))]
    Settings(Vec<String>),
    /// Occurs when the loss or a gradient becomes NaN or infinite.
    #[error(
        "step {step}: {what} is {value}; stopped. The last good checkpoint is {last_checkpoint}"
    )]
    NonFinite {
        /// The optimizer step.
        step: usize,
        /// `loss` or the first gradient tensor at fault.
        what: String,
        /// The value seen.
        value: f64,
        /// Where to resume from.
        last_checkpoint: String,
    },
    /// Occurs when a checkpoint cannot be resumed from.
    #[error("{path}: {msg}")]
    Checkpoint {
        /// The checkpoint folder.
        path: String,
        /// What is wrong.
        msg: String,
    },
    /// Occurs when the estimated memory exceeds what is available.
    #[error("{0}")]
    Memory(String),
    /// Model errors.
    #[error(transparent)]
    Model(#[from] crate::model::Error),
    /// Adapter errors.
    #[error(transparent)]
    Adapter(#[from] crate::adapter::Error),
    /// File errors.
    #[error(transparent)]
    Io(#[from] crate::io::Error),
}

impl Error {
    /// A [`Error::NonFinite`] naming `checkpoint` as the one to resume from (other errors are
    /// returned as they are).
    pub fn with_last_checkpoint(self, checkpoint: &str) -> Self {
        match self {
            Error::NonFinite {
                step, what, value, ..
            } => Error::NonFinite {
                step,
                what,
                value,
                last_checkpoint: checkpoint.to_string(),
            },
            other => other,
        }
    }
}

/// Result type of the `train` module.
pub type Result<T> = std::result::Result<T, Error>;
