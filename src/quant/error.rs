//! Errors of the `quant` module: bad quantization parameters and inconsistent 4-bit checkpoints.

/// What can go wrong while quantizing, dequantizing or reading a bitsandbytes 4-bit tensor.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Occurs when a blocksize is not one of 32, 64, …, 4096.
    #[error("unsupported blocksize {0}: bitsandbytes supports 32, 64, 128, 256, 512, 1024, 2048 and 4096")]
    UnsupportedBlocksize(usize),
    /// Occurs when a quant type string is neither `nf4` nor `fp4`.
    #[error("unknown quant type {0:?}: expected \"nf4\" or \"fp4\"")]
    UnknownQuantType(String),
    /// Occurs when a dtype string is not float32, bfloat16 or float16.
    #[error("unsupported dtype {0:?}: expected float32, bfloat16 or float16")]
    UnsupportedDtype(String),
    /// Occurs when a quantized tensor's pieces disagree (byte count, absmax length, shape).
    #[error("tensor {name}: {problem}")]
    Inconsistent {
        /// The checkpoint key of the weight.
        name: String,
        /// What does not match, with expected and found values.
        problem: String,
    },
    /// Occurs when a tensor that a quantized weight needs is missing from the checkpoint.
    #[error("tensor {name}: missing {what}")]
    Missing {
        /// The checkpoint key of the weight.
        name: String,
        /// The missing part, e.g. `weight.absmax`.
        what: String,
    },
    /// Occurs when the packed quant-state JSON cannot be parsed.
    #[error("tensor {name}: malformed quant_state JSON: {msg}")]
    BadQuantState {
        /// The checkpoint key of the weight.
        name: String,
        /// The parser's message.
        msg: String,
    },
    /// A checkpoint file that cannot be read, parsed or written (names the file).
    #[error(transparent)]
    Io(#[from] crate::io::Error),
}

/// Result type of the `quant` module.
pub type Result<T> = std::result::Result<T, Error>;
