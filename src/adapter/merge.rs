//! Folding an adapter into its base weight (PEFT `merge_and_unload`, spec §3.5–3.6):
//! LoRA `W' = W + s·B·A`; DoRA `W' = (m / ‖W + s·B·A‖_row) ⊙ (W + s·B·A)`, in f32 from the
//! (dequantized) base. Re-quantization of the result is the caller's choice (`quant`).

use super::base::BaseWeight;
use super::dora;
use super::lora::LoraAdapter;
use crate::ops;

/// The merged dense weight (out × in), f32.
pub fn merged_weight(base: &BaseWeight, adapter: &LoraAdapter) -> Vec<f32> {
    let (out, inp, r) = (adapter.out_features(), adapter.in_features(), adapter.r());
    let mut w = base.to_f32().into_owned();
    let ba = ops::matmul_nn(adapter.lora_b(), out, adapter.lora_a(), r, inp);
    let s = adapter.scaling();
    for (wv, d) in w.iter_mut().zip(&ba) {
        *wv += s * d;
    }
    if let Some(m) = adapter.magnitude() {
        for (o, row) in w.chunks_mut(inp).enumerate() {
            let n = row.iter().map(|v| v * v).sum::<f32>().sqrt();
            let k = m[o] / n.max(dora::NORM_EPS);
            row.iter_mut().for_each(|v| *v *= k);
        }
    }
    w
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::config::InitLoraWeights;
    use crate::adapter::lora::{AdapterKind, AdapterOptions, AdapterParam, DoraDropout};
    use crate::ops::Rng;

    #[test]
    fn merged_forward_equals_unmerged() {
        let (out, inp, n) = (6, 9, 4);
        let mut rng = Rng::new(4);
        let w: Vec<f32> = (0..out * inp).map(|_| rng.normal()).collect();
        let base = BaseWeight::Dense { w, out, inp };
        for kind in [AdapterKind::Lora, AdapterKind::Dora] {
            let opts = AdapterOptions {
                kind,
                r: 3,
                scaling: 2.0,
                dropout: 0.0,
                dora_dropout: DoraDropout::Peft,
            };
            let mut a = LoraAdapter::new(&base, &opts, InitLoraWeights::Random, &mut rng);
            if let Some(m) = a.param_mut(AdapterParam::Magnitude) {
                m.iter_mut().for_each(|v| *v *= 1.3);
            }
            let x: Vec<f32> = (0..n * inp).map(|_| rng.normal()).collect();
            let y = a.forward(&base, &x, n);
            let merged = BaseWeight::Dense {
                w: merged_weight(&base, &a),
                out,
                inp,
            };
            let ym = merged.forward(&x, n);
            for i in 0..n * out {
                assert!((y[i] - ym[i]).abs() < 1e-4 * (1.0 + ym[i].abs()));
            }
        }
    }
}
