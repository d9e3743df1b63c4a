//! [`RmsNorm`]: `y = x · rstd · w`, `rstd = 1/√(mean(x²) + eps)` per row (HF `LlamaRMSNorm`,
//! computed in f32).
//!
//! Backward: with `g = dy ⊙ w`, `dx = rstd · (g − x · rstd² · mean(g ⊙ x))`,
//! `dw = Σ_rows dy ⊙ x · rstd`. Shapes: x, y (N, D); w (D); rstd (N).

use rayon::prelude::*;

use crate::ops;

/// Rows per parallel task.
const ROWS: usize = 16;

/// Root-mean-square normalisation with a learned scale.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    /// `weight`: (D).
    pub weight: Vec<f32>,
    /// Epsilon inside the square root.
    pub eps: f32,
    /// Full fine-tuning: the weight trains.
    pub train: bool,
}

/// Saved for backward: `rstd` (N). The input is kept by the caller.
pub struct RmsNormSaved {
    rstd: Vec<f32>,
}

impl RmsNorm {
    /// A frozen norm.
    pub fn new(weight: Vec<f32>, eps: f32) -> Self {
        Self {
            weight,
            eps,
            train: false,
        }
    }

    fn rstd(&self, row: &[f32]) -> f32 {
        let ms = ops::dot(row, row) / row.len() as f32;
        1.0 / (ms + self.eps).sqrt()
    }

    /// Inference.
    pub fn forward(&self, x: &[f32]) -> Vec<f32> {
        self.forward_train(x).0
    }

    /// Training forward: output and saved `rstd`. Rows run in parallel.
    pub fn forward_train(&self, x: &[f32]) -> (Vec<f32>, RmsNormSaved) {
        let d = self.weight.len();
        let mut y = vec![0f32; x.len()];
        let mut rstd = vec![0f32; x.len() / d];
        y.par_chunks_mut(d * ROWS)
            .zip(x.par_chunks(d * ROWS))
            .zip(rstd.par_chunks_mut(ROWS))
            .for_each(|((yb, xb), rb)| {
                for ((yr, xr), r) in yb.chunks_mut(d).zip(xb.chunks(d)).zip(rb) {
                    *r = self.rstd(xr);
                    for ((o, &v), &w) in yr.iter_mut().zip(xr).zip(&self.weight) {
                        *o = w * (v * *r);
                    }
                }
            });
        (y, RmsNormSaved { rstd })
    }

    /// Backward: `dx` and `dw` (when the weight trains). Rows run in parallel; `dw` is summed
    /// from per-block partials in block order, so it does not depend on thread scheduling.
    pub fn backward(
        &self,
        saved: RmsNormSaved,
        x: &[f32],
        dy: &[f32],
    ) -> (Vec<f32>, Option<Vec<f32>>) {
        let d = self.weight.len();
        let mut dx = vec![0f32; x.len()];
        let partials: Vec<Vec<f32>> = dx
            .par_chunks_mut(d * ROWS)
            .zip(x.par_chunks(d * ROWS))
            .zip(dy.par_chunks(d * ROWS))
            .zip(saved.rstd.par_chunks(ROWS))
            .map(|(((dxb, xb), gb), rb)| {
                let mut dw = if self.train {
                    vec![0f32; d]
                } else {
                    Vec::new()
                };
                for (((dxr, xr), gr), &r) in dxb
                    .chunks_mut(d)
                    .zip(xb.chunks(d))
                    .zip(gb.chunks(d))
                    .zip(rb)
                {
                    // g = dy ⊙ w, held in dx's row until dx overwrites it
                    for ((o, &gv), &w) in dxr.iter_mut().zip(gr).zip(&self.weight) {
                        *o = gv * w;
                    }
                    let c = ops::dot(dxr, xr) / d as f32 * r * r;
                    for (o, &xv) in dxr.iter_mut().zip(xr) {
                        *o = r * (*o - xv * c);
                    }
                    for ((g, &xv), &gv) in dw.iter_mut().zip(xr).zip(gr) {
                        *g += gv * xv * r;
                    }
                }
                dw
            })
            .collect();
        let dw = self.train.then(|| ops::reduce_parts(&partials, d));
        (dx, dw)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::Rng;

    #[test]
    fn gradients_match_finite_differences() {
        let mut rng = Rng::new(7);
        let d = 8;
        let mut n = RmsNorm::new((0..d).map(|_| 1.0 + 0.3 * rng.normal()).collect(), 1e-5);
        n.train = true;
        // 37 rows: three parallel blocks, so dw sums partials
        let x: Vec<f32> = (0..37 * d).map(|_| rng.normal()).collect();
        let c: Vec<f32> = (0..37 * d).map(|_| rng.normal()).collect();
        let loss = |n: &RmsNorm, x: &[f32]| -> f64 {
            n.forward(x)
                .iter()
                .zip(&c)
                .map(|(a, b)| (a * b) as f64)
                .sum()
        };
        let (_, s) = n.forward_train(&x);
        let (dx, dw) = n.backward(s, &x, &c);
        let h = 1e-2;
        for i in 0..x.len() {
            let mut p = x.clone();
            p[i] += h;
            let lp = loss(&n, &p);
            p[i] -= 2.0 * h;
            let num = (lp - loss(&n, &p)) / (2.0 * h as f64);
            assert!(
                (num - dx[i] as f64).abs() < 1e-2,
                "dx[{i}] {num} vs {}",
                dx[i]
            );
        }
        let dw = dw.unwrap();
        for i in 0..d {
            let mut p = n.clone();
            p.weight[i] += h;
            let lp = loss(&p, &x);
            p.weight[i] -= 2.0 * h;
            let num = (lp - loss(&p, &x)) / (2.0 * h as f64);
            assert!((num - dw[i] as f64).abs() < 1e-2);
        }
    }
}
