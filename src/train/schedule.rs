//! Learning-rate schedules with linear warm-up, as transformers' `get_constant_schedule_with_warmup`,
//! `get_linear_schedule_with_warmup` and `get_cosine_schedule_with_warmup`.

use serde::{Deserialize, Serialize};

/// Schedule shape after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// Constant.
    Constant,
    /// Linear decay to 0 at the last step.
    Linear,
    /// Half-cosine decay to 0.
    #[default]
    Cosine,
}

impl Schedule {
    /// Learning rate for optimizer step `step` (0-based) of `total`.
    pub fn lr(self, base: f32, step: usize, warmup: usize, total: usize) -> f32 {
        if step < warmup {
            return base * step as f32 / warmup.max(1) as f32;
        }
        let progress = (step - warmup) as f32 / (total.saturating_sub(warmup)).max(1) as f32;
        match self {
            Schedule::Constant => base,
            Schedule::Linear => base * (1.0 - progress).max(0.0),
            Schedule::Cosine => {
                base * (0.5 * (1.0 + (std::f32::consts::PI * progress).cos())).max(0.0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_decay() {
        assert_eq!(Schedule::Linear.lr(1.0, 0, 2, 10), 0.0);
        assert_eq!(Schedule::Linear.lr(1.0, 1, 2, 10), 0.5);
        assert_eq!(Schedule::Linear.lr(1.0, 2, 2, 10), 1.0);
        assert!((Schedule::Cosine.lr(1.0, 6, 2, 10) - 0.5).abs() < 1e-6);
        assert_eq!(Schedule::Constant.lr(0.3, 9, 2, 10), 0.3);
    }
}
