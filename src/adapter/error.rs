//! Errors of the `adapter` module: bad `adapter_config.json`, adapter files that do not fit the
//! model, and I/O.

/// What can go wrong with an adapter's configuration or files.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Occurs when `adapter_config.json` has a field with a wrong type or value.
    #[error("{path}: field {field}: {msg}")]
    Config {
        /// The config file (or `<options>` for a config built in code).
        path: String,
        /// The JSON key at fault.
        field: String,
        /// What was expected and found.
        msg: String,
    },
    /// Occurs when an adapter's tensors do not match the model it is loaded into. Lists every
    /// problem found, not only the first.
    #[error("{path}: adapter does not fit the model:\n  {}", problems.join("\n  "))]
    Mismatch {
        /// The adapter file.
        path: String,
        /// One line per missing, unexpected or misshaped tensor.
        problems: Vec<String>,
    },
    /// Occurs when a training setting is invalid for a layer (e.g. rank larger than the layer).
    #[error("{module}: {msg}")]
    Invalid {
        /// Module path.
        module: String,
        /// What is wrong.
        msg: String,
    },
    /// File reading or writing.
    #[error(transparent)]
    Io(#[from] crate::io::Error),
    /// A quantization error (e.g. re-quantizing a merged weight).
    #[error(transparent)]
    Quant(#[from] crate::quant::Error),
}

/// Result type of the `adapter` module.
pub type Result<T> = std::result::Result<T, Error>;
