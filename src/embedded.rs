//! The bundled defaults compiled into the binary: the pretrained stories260K model (MIT, see
//! `models/stories260K/README.md`) and the tinyshakespeare text (public domain), so that
//! `qdora train` and `qdora generate` work with no arguments on a fresh machine.

use std::path::PathBuf;

const MODEL_FILES: [(&str, &[u8]); 6] = [
    (
        "config.json",
        include_bytes!("../models/stories260K/config.json"),
    ),
    (
        "generation_config.json",
        include_bytes!("../models/stories260K/generation_config.json"),
    ),
    (
        "model.safetensors",
        include_bytes!("../models/stories260K/model.safetensors"),
    ),
    (
        "tokenizer.json",
        include_bytes!("../models/stories260K/tokenizer.json"),
    ),
    (
        "tokenizer_config.json",
        include_bytes!("../models/stories260K/tokenizer_config.json"),
    ),
    (
        "README.md",
        include_bytes!("../models/stories260K/README.md"),
    ),
];

const SHAKESPEARE: &[u8] = include_bytes!("../data/tinyshakespeare/input.txt");

fn materialize(name: &str, files: &[(&str, &[u8])]) -> std::io::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "qdora-embedded-{}-{name}",
        env!("CARGO_PKG_VERSION")
    ));
    let complete = dir.join(".complete");
    if complete.exists() {
        return Ok(dir);
    }
    let tmp = dir.with_extension(format!("tmp-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    for (f, bytes) in files {
        std::fs::write(tmp.join(f), bytes)?;
    }
    std::fs::write(tmp.join(".complete"), b"")?;
    match std::fs::rename(&tmp, &dir) {
        Ok(()) => Ok(dir),
        Err(_) if complete.exists() => {
            let _ = std::fs::remove_dir_all(&tmp);
            Ok(dir)
        }
        Err(e) => Err(e),
    }
}

/// The folder holding the bundled stories260K model (written once to the temp directory).
///
/// # Errors
/// If the temp directory is not writable.
pub fn stories260k() -> std::io::Result<PathBuf> {
    materialize("stories260K", &MODEL_FILES)
}

/// The bundled tinyshakespeare text file.
///
/// # Errors
/// If the temp directory is not writable.
pub fn tinyshakespeare() -> std::io::Result<PathBuf> {
    Ok(materialize("tinyshakespeare", &[("input.txt", SHAKESPEARE)])?.join("input.txt"))
}
