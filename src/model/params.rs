//! The parameter registry: typed names for a Llama's linears ([`Proj`]) and for every tensor
//! that can train ([`ParamId`]), and the one place their checkpoint keys are spelled.
//!
//! [`Llama::trainable`](super::Llama::trainable) walks the model once and lists the ids of what
//! trains; gradients come back tagged with the same ids, AdamW keeps its moments by them,
//! checkpoints and adapter files name tensors by [`ParamId::key`], and counts sum over them.
//! (llm.c mirrors parameters and gradients the same way, by position in one list.)

use crate::adapter::{peft_io, AdapterParam};

/// One of the seven linears of a decoder layer, by its checkpoint name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proj {
    /// `self_attn.q_proj`: (H·Dh, D).
    QProj,
    /// `self_attn.k_proj`: (Hkv·Dh, D).
    KProj,
    /// `self_attn.v_proj`: (Hkv·Dh, D).
    VProj,
    /// `self_attn.o_proj`: (D, H·Dh).
    OProj,
    /// `mlp.gate_proj`: (F, D).
    GateProj,
    /// `mlp.up_proj`: (F, D).
    UpProj,
    /// `mlp.down_proj`: (D, F).
    DownProj,
}

impl Proj {
    /// All seven, in a layer's order.
    pub const ALL: [Proj; 7] = [
        Proj::QProj,
        Proj::KProj,
        Proj::VProj,
        Proj::OProj,
        Proj::GateProj,
        Proj::UpProj,
        Proj::DownProj,
    ];

    /// The checkpoint name (`q_proj`, …).
    pub fn name(self) -> &'static str {
        match self {
            Proj::QProj => "q_proj",
            Proj::KProj => "k_proj",
            Proj::VProj => "v_proj",
            Proj::OProj => "o_proj",
            Proj::GateProj => "gate_proj",
            Proj::UpProj => "up_proj",
            Proj::DownProj => "down_proj",
        }
    }

    /// The sub-module holding it (`self_attn` or `mlp`).
    pub fn group(self) -> &'static str {
        match self {
            Proj::GateProj | Proj::UpProj | Proj::DownProj => "mlp",
            _ => "self_attn",
        }
    }

    /// The linear named `name` (`q_proj`, …), if any.
    pub fn from_name(name: &str) -> Option<Proj> {
        Proj::ALL.into_iter().find(|p| p.name() == name)
    }

    /// Module path in layer `layer`: `model.layers.{layer}.{group}.{name}`.
    pub fn path(self, layer: usize) -> String {
        format!("model.layers.{layer}.{}.{}", self.group(), self.name())
    }
}

/// One trainable tensor of a Llama.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ParamId {
    /// `model.embed_tokens.weight` (full fine-tuning, `modules_to_save`, or a tied head).
    EmbedTokens,
    /// `model.layers.{i}.input_layernorm.weight`.
    InputLayernorm(usize),
    /// `model.layers.{i}.post_attention_layernorm.weight`.
    PostAttentionLayernorm(usize),
    /// `model.layers.{i}.self_attn.q_norm.weight` (Qwen3).
    QNorm(usize),
    /// `model.layers.{i}.self_attn.k_norm.weight` (Qwen3).
    KNorm(usize),
    /// A linear's `weight` (full fine-tuning).
    Weight(usize, Proj),
    /// A linear's `bias`.
    Bias(usize, Proj),
    /// A tensor of a linear's adapter.
    Adapter(usize, Proj, AdapterParam),
    /// `model.norm.weight`.
    Norm,
    /// `lm_head.weight` (untied).
    LmHead,
}

impl ParamId {
    /// The tensor's key: the checkpoint key for model tensors, PEFT's adapter key for adapter
    /// tensors. Training checkpoints and AdamW state use these names.
    pub fn key(self) -> String {
        match self {
            ParamId::EmbedTokens => "model.embed_tokens.weight".into(),
            ParamId::InputLayernorm(i) => format!("model.layers.{i}.input_layernorm.weight"),
            ParamId::PostAttentionLayernorm(i) => {
                format!("model.layers.{i}.post_attention_layernorm.weight")
            }
            ParamId::QNorm(i) => format!("model.layers.{i}.self_attn.q_norm.weight"),
            ParamId::KNorm(i) => format!("model.layers.{i}.self_attn.k_norm.weight"),
            ParamId::Weight(i, p) => format!("{}.weight", p.path(i)),
            ParamId::Bias(i, p) => format!("{}.bias", p.path(i)),
            ParamId::Adapter(i, p, a) => peft_io::key(&p.path(i), a),
            ParamId::Norm => "model.norm.weight".into(),
            ParamId::LmHead => "lm_head.weight".into(),
        }
    }
}

/// Shows the tensor's [key](ParamId::key).
impl std::fmt::Display for ParamId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.key())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_the_checkpoint_and_peft_names() {
        assert_eq!(
            Proj::GateProj.path(3),
            "model.layers.3.mlp.gate_proj",
            "a linear's module path"
        );
        assert_eq!(
            ParamId::Bias(0, Proj::QProj).key(),
            "model.layers.0.self_attn.q_proj.bias"
        );
        assert_eq!(
            ParamId::Adapter(2, Proj::DownProj, AdapterParam::Magnitude).key(),
            "base_model.model.model.layers.2.mlp.down_proj.lora_magnitude_vector"
        );
        assert_eq!(
            ParamId::Adapter(2, Proj::VProj, AdapterParam::LoraA).key(),
            "base_model.model.model.layers.2.self_attn.v_proj.lora_A.weight"
        );
        for p in Proj::ALL {
            assert_eq!(Proj::from_name(p.name()), Some(p));
        }
        assert_eq!(Proj::from_name("w1"), None);
    }
}
