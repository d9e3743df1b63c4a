//! Errors of the `model` module: configs, checkpoints and tokenizers that do not fit together.

/// What can go wrong loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Occurs when `config.json` is missing a field, has a wrong value, or names an unsupported
    /// architecture or option.
    #[error("{path}: {field}: {msg}")]
    Config {
        /// The config file.
        path: String,
        /// The key at fault.
        field: String,
        /// What was expected and found.
        msg: String,
    },
    /// Occurs when a tensor's shape disagrees with the config.
    #[error("{path}: tensor {name} has shape {got:?}, config implies {expected:?}")]
    Shape {
        /// The checkpoint.
        path: String,
        /// The key.
        name: String,
        /// What the config implies.
        expected: Vec<usize>,
        /// What the file holds.
        got: Vec<usize>,
    },
    /// Occurs when a weight holds NaN or infinity.
    #[error("{path}: tensor {name} has a non-finite value ({value}) at index {index}")]
    NonFinite {
        /// The checkpoint.
        path: String,
        /// The key.
        name: String,
        /// Flat index of the first bad value.
        index: usize,
        /// The value.
        value: f32,
    },
    /// Occurs when the tokenizer cannot be loaded or used.
    #[error("{path}: {msg}")]
    Tokenizer {
        /// tokenizer.json or tokenizer_config.json.
        path: String,
        /// The tokenizer library's message.
        msg: String,
    },
    /// Occurs when input token ids are out of the vocabulary or sequences are too long.
    #[error("{0}")]
    Input(String),
    /// File reading.
    #[error(transparent)]
    Io(#[from] crate::io::Error),
    /// A 4-bit weight that cannot be read.
    #[error(transparent)]
    Quant(#[from] crate::quant::Error),
    /// An adapter that does not fit.
    #[error(transparent)]
    Adapter(#[from] crate::adapter::Error),
}

/// Result type of the `model` module.
pub type Result<T> = std::result::Result<T, Error>;
