//! [`Rope`]: rotary position embeddings as HF Llama applies them (`rotate_half`: pairs `i` and
//! `i + Dh/2`), with default, linear and llama3 frequency scaling.
//!
//! Forward per head: `(a, b) → (a·cos − b·sin, b·cos + a·sin)`; backward is the inverse rotation
//! (`sin → −sin`). Tables: cos/sin (P, Dh/2), computed in f32 as transformers does.

use crate::model::config::RopeScaling;

/// Cos/sin tables for positions `0..len`.
#[derive(Debug, Clone)]
pub struct Rope {
    /// Head dimension Dh.
    pub head_dim: usize,
    inv_freq: Vec<f32>,
    cos: Vec<f32>,
    sin: Vec<f32>,
    len: usize,
}

impl Rope {
    /// Frequencies for `head_dim`, `theta` and the scaling.
    pub fn new(head_dim: usize, theta: f32, scaling: RopeScaling) -> Self {
        let half = head_dim / 2;
        let mut inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0 / theta.powf((2 * i) as f32 / head_dim as f32))
            .collect();
        match scaling {
            RopeScaling::Default => {}
            RopeScaling::Linear { factor } => inv_freq.iter_mut().for_each(|f| *f /= factor),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old,
            } => {
                let low_wl = old / low_freq_factor;
                let high_wl = old / high_freq_factor;
                for f in inv_freq.iter_mut() {
                    let wl = 2.0 * std::f32::consts::PI / *f;
                    let scaled = if wl > low_wl { *f / factor } else { *f };
                    let medium = wl >= high_wl && wl <= low_wl;
                    *f = if medium {
                        let smooth =
                            (old / wl - low_freq_factor) / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * scaled / factor + smooth * scaled
                    } else {
                        scaled
                    };
                }
            }
        }
        Self {
            head_dim,
            inv_freq,
            cos: vec![],
            sin: vec![],
            len: 0,
        }
    }

    /// Makes sure the tables cover positions `0..len`.
    pub fn ensure(&mut self, len: usize) {
        if len <= self.len {
            return;
        }
        let half = self.head_dim / 2;
        self.cos = Vec::with_capacity(len * half);
        self.sin = Vec::with_capacity(len * half);
        for p in 0..len {
            for &f in &self.inv_freq {
                let a = p as f32 * f;
                self.cos.push(a.cos());
                self.sin.push(a.sin());
            }
        }
        self.len = len;
    }

    /// Rotates `x` (rows of `heads · Dh`) in place; row `i` has position `pos(i)`.
    /// `inverse` applies the transpose rotation (the backward pass).
    ///
    /// # Panics
    /// If a position is beyond [`ensure`](Self::ensure)'d length.
    pub fn apply(&self, x: &mut [f32], heads: usize, pos: impl Fn(usize) -> usize, inverse: bool) {
        let dh = self.head_dim;
        let half = dh / 2;
        let sign = if inverse { -1.0 } else { 1.0 };
        for (i, row) in x.chunks_mut(heads * dh).enumerate() {
            let p = pos(i);
            assert!(p < self.len, "position {p} beyond RoPE table {}", self.len);
            let c = &self.cos[p * half..(p + 1) * half];
            let s = &self.sin[p * half..(p + 1) * half];
            for h in row.chunks_mut(dh) {
                let (a, b) = h.split_at_mut(half);
                for ((a, b), (&c, &s)) in a.iter_mut().zip(b).zip(c.iter().zip(s)) {
                    let (x1, x2) = (*a, *b);
                    let sn = sign * s;
                    *a = x1 * c - x2 * sn;
                    *b = x2 * c + x1 * sn;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inverse_undoes_forward() {
        let mut r = Rope::new(8, 10000.0, RopeScaling::Default);
        r.ensure(5);
        let x: Vec<f32> = (0..5 * 16).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut y = x.clone();
        r.apply(&mut y, 2, |i| i, false);
        assert_ne!(x, y);
        r.apply(&mut y, 2, |i| i, true);
        for (a, b) in x.iter().zip(&y) {
            assert!((a - b).abs() < 1e-5);
        }
    }

    #[test]
    fn llama3_scaling_keeps_high_frequencies() {
        let base = Rope::new(64, 500000.0, RopeScaling::Default);
        let l3 = Rope::new(
            64,
            500000.0,
            RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192.0,
            },
        );
        assert_eq!(base.inv_freq[0], l3.inv_freq[0]);
        assert!((l3.inv_freq[31] - base.inv_freq[31] / 8.0).abs() < 1e-12);
    }
}
