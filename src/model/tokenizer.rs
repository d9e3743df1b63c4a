//! Tokenization with the `tokenizers` crate from `tokenizer.json`, special tokens and the chat
//! template from `tokenizer_config.json` (rendered with `minijinja`), and
//! `generation_config.json` defaults.

use std::path::Path;

use serde_json::Value;

use super::error::{Error, Result};

/// A model's tokenizer with its special tokens and chat template.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// BOS token text.
    pub bos_token: Option<String>,
    /// EOS token text.
    pub eos_token: Option<String>,
    /// EOS token id.
    pub eos_token_id: Option<u32>,
    /// BOS token id.
    pub bos_token_id: Option<u32>,
    /// Jinja chat template, if the model has one.
    pub chat_template: Option<String>,
    path: String,
}

/// One chat message.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

/// The text of a special token entry of `tokenizer_config.json` (`"<s>"` or
/// `{"content": "<s>", ...}`).
pub fn token_text(v: Option<&Value>) -> Option<&str> {
    match v? {
        Value::String(s) => Some(s),
        Value::Object(o) => o.get("content")?.as_str(),
        _ => None,
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json` (+ `tokenizer_config.json` if present) from `dir`.
    ///
    /// # Errors
    /// [`Error::Tokenizer`] naming the file.
    pub fn load(dir: &Path) -> Result<Self> {
        let tj = dir.join("tokenizer.json");
        let path = tj.display().to_string();
        if !tj.exists() {
            return Err(Error::Tokenizer {
                path,
                msg: "not found (a model without tokenizer.json can train on pre-tokenized data)"
                    .into(),
            });
        }
        let inner = tokenizers::Tokenizer::from_file(&tj).map_err(|e| Error::Tokenizer {
            path: path.clone(),
            msg: e.to_string(),
        })?;
        let tc = dir.join("tokenizer_config.json");
        let cfg: Value = if tc.exists() {
            let text = std::fs::read_to_string(&tc).map_err(|e| Error::Tokenizer {
                path: tc.display().to_string(),
                msg: e.to_string(),
            })?;
            serde_json::from_str(&text).map_err(|e| Error::Tokenizer {
                path: tc.display().to_string(),
                msg: format!("invalid JSON: {e}"),
            })?
        } else {
            Value::Null
        };
        let bos_token = token_text(cfg.get("bos_token")).map(String::from);
        let eos_token = token_text(cfg.get("eos_token")).map(String::from);
        let chat_template = match cfg.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            _ => {
                let jinja = dir.join("chat_template.jinja");
                std::fs::read_to_string(jinja).ok()
            }
        };
        let id = |t: &Option<String>| t.as_ref().and_then(|t| inner.token_to_id(t));
        Ok(Self {
            bos_token_id: id(&bos_token),
            eos_token_id: id(&eos_token),
            inner,
            bos_token,
            eos_token,
            chat_template,
            path,
        })
    }

    /// A tokenizer from `tokenizer.json` bytes alone (no special-token config).
    ///
    /// # Errors
    /// [`Error::Tokenizer`].
    pub fn from_json_bytes(bytes: &[u8]) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_bytes(bytes).map_err(|e| Error::Tokenizer {
            path: "<memory>".into(),
            msg: e.to_string(),
        })?;
        Ok(Self {
            inner,
            bos_token: None,
            eos_token: None,
            eos_token_id: None,
            bos_token_id: None,
            chat_template: None,
            path: "<memory>".into(),
        })
    }

    /// Encodes text; `add_special` applies the post-processor (e.g. BOS).
    ///
    /// # Errors
    /// [`Error::Tokenizer`].
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special)
            .map_err(|e| Error::Tokenizer {
                path: self.path.clone(),
                msg: e.to_string(),
            })?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decodes ids (special tokens skipped).
    ///
    /// # Errors
    /// [`Error::Tokenizer`].
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(|e| Error::Tokenizer {
            path: self.path.clone(),
            msg: e.to_string(),
        })
    }

    /// Renders messages with the chat template.
    ///
    /// # Errors
    /// [`Error::Tokenizer`] when there is no template or it fails to render.
    pub fn apply_chat_template(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let tpl = self
            .chat_template
            .as_ref()
            .ok_or_else(|| Error::Tokenizer {
                path: self.path.clone(),
                msg: "the model has no chat_template".into(),
            })?;
        let mut env = minijinja::Environment::new();
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template("chat", tpl)
            .map_err(|e| Error::Tokenizer {
                path: self.path.clone(),
                msg: format!("chat template: {e}"),
            })?;
        let t = env.get_template("chat").map_err(|e| Error::Tokenizer {
            path: self.path.clone(),
            msg: e.to_string(),
        })?;
        t.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone().unwrap_or_default(),
        })
        .map_err(|e| Error::Tokenizer {
            path: self.path.clone(),
            msg: format!("chat template: {e}"),
        })
    }
}

/// `generation_config.json` defaults.
#[derive(Debug, Clone, Default)]
pub struct GenerationConfig {
    /// Default temperature.
    pub temperature: Option<f32>,
    /// Default top-k.
    pub top_k: Option<usize>,
    /// Default top-p.
    pub top_p: Option<f32>,
    /// Whether sampling is the default.
    pub do_sample: Option<bool>,
    /// Stop ids.
    pub eos_token_ids: Vec<u32>,
}

impl GenerationConfig {
    /// Reads `<dir>/generation_config.json` if present.
    pub fn load(dir: &Path) -> Self {
        let Ok(text) = std::fs::read_to_string(dir.join("generation_config.json")) else {
            return Self::default();
        };
        let Ok(v) = serde_json::from_str::<Value>(&text) else {
            return Self::default();
        };
        let eos = super::config::token_ids(v.get("eos_token_id"));
        Self {
            temperature: v
                .get("temperature")
                .and_then(|x| x.as_f64())
                .map(|x| x as f32),
            top_k: v.get("top_k").and_then(|x| x.as_u64()).map(|x| x as usize),
            top_p: v.get("top_p").and_then(|x| x.as_f64()).map(|x| x as f32),
            do_sample: v.get("do_sample").and_then(|x| x.as_bool()),
            eos_token_ids: eos,
        }
    }
}
