//! Benchmarks that print figures (never asserted): quantization kernels (GB/s, GFLOP/s next to
//! the dense f32 matmul of the same shape), one adapted Linear's forward+backward in the five
//! flavours, and whole training steps (tokens/s, MFU against the matmul ceiling measured in the
//! same process, peak memory). `qdora bench` and `benches/` both call these.

use std::time::Instant;

use serde::Serialize;

use crate::adapter::{
    AdapterKind, AdapterOptions, BaseWeight, DoraDropout, InitLoraWeights, LoraAdapter,
};
use crate::model::layers::Linear;
use crate::model::{random, Llama};
use crate::ops::bf16::ComputeDtype;
use crate::ops::{self, Rng};
use crate::quant::{Dtype, QuantizeOptions, QuantizedWeight};
use crate::train::optim::{AdamW, AdamWOptions};
use crate::train::trainer::optimizer_step;
use crate::train::{build_model, prepare_model, Batch, Mode, TrainConfig};

fn best_of<F: FnMut()>(reps: usize, mut f: F) -> f64 {
    let mut best = f64::MAX;
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed().as_secs_f64());
    }
    best
}

fn data(n: usize, seed: u64) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| r.normal()).collect()
}

/// One line of the quantization benchmark.
#[derive(Debug, Serialize)]
pub struct QuantLine {
    /// What was measured.
    pub op: String,
    /// Shape description.
    pub shape: String,
    /// Seconds (best of 3).
    pub seconds: f64,
    /// GB/s of f32 data (quantize: input, dequantize: output).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gb_per_s: Option<f64>,
    /// GFLOP/s (matmuls).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gflops: Option<f64>,
    /// 4-bit matmul GFLOP/s divided by the dense f32 one of the same shape.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vs_dense: Option<f64>,
}

impl QuantLine {
    /// A product's line: `flops` done in `seconds`, with its ratio to the dense product's
    /// time where it has one.
    fn product(op: &str, shape: &str, seconds: f64, flops: f64, dense_s: Option<f64>) -> Self {
        QuantLine {
            op: op.to_string(),
            shape: shape.to_string(),
            seconds,
            gb_per_s: None,
            gflops: Some(flops / seconds / 1e9),
            vs_dense: dense_s.map(|td| td / seconds),
        }
    }
}

/// The f32 and bf16 products side by side: `size³` and the training shapes of
/// `llama-small-1024` (1024 tokens through its q/o, gate/up and down projections), f32 through
/// gemm and bf16 on every kernel set this CPU has, each with its ratio to the f32 product.
fn gemm_lines(quick: bool) -> Vec<QuantLine> {
    use crate::ops::bf16::{gemm_gflops, Bf16Kernel};
    let shapes: Vec<(usize, usize, usize)> = if quick {
        vec![(512, 512, 512), (256, 704, 256)]
    } else {
        vec![
            (2048, 2048, 2048),
            (1024, 1024, 1024),
            (1024, 2816, 1024),
            (1024, 1024, 2816),
        ]
    };
    let mut out = Vec::new();
    for (m, n, k) in shapes {
        let shape = format!("{m}x{k}·{k}x{n}");
        let flops = 2.0 * (m * n * k) as f64;
        let f32_s = flops / ops::matmul_gflops((m, n, k), 3) / 1e9;
        out.push(QuantLine::product("gemm f32", &shape, f32_s, flops, None));
        for kernel in Bf16Kernel::ALL.into_iter().filter(|k| k.available()) {
            let s = flops / gemm_gflops(kernel, (m, n, k), 3) / 1e9;
            let op = format!("gemm bf16 {}", kernel.name());
            out.push(QuantLine::product(&op, &shape, s, flops, Some(f32_s)));
        }
    }
    out
}

/// Quantization kernels: quantize / dequantize throughput and the fused 4-bit matmuls next to
/// dense f32 matmuls of the same shapes ([M×4096]·[N×4096]ᵀ, N = 4096 and 11008, M = 512),
/// after the f32 and bf16 products side by side ([`gemm_lines`]).
pub fn quant(quick: bool) -> Vec<QuantLine> {
    let (m, k) = if quick { (128, 1024) } else { (512, 4096) };
    let ns: Vec<usize> = if quick {
        vec![1024, 2752]
    } else {
        vec![4096, 11008]
    };
    let mut out = gemm_lines(quick);
    let w = data(k * k, 1);
    let bytes = (k * k * 4) as f64;
    let opts = QuantizeOptions::default();
    let mut q = None;
    let t = best_of(3, || {
        q = Some(QuantizedWeight::quantize(&w, &[k, k], Dtype::F32, opts).expect("valid options"))
    });
    let q = q.expect("quantized");
    out.push(QuantLine {
        op: "quantize nf4+dq".into(),
        shape: format!("{k}x{k}"),
        seconds: t,
        gb_per_s: Some(bytes / t / 1e9),
        gflops: None,
        vs_dense: None,
    });
    let mut sink = 0f32;
    let t = best_of(3, || sink += q.dequantize()[7]);
    out.push(QuantLine {
        op: "dequantize -> f32 (fresh allocation)".into(),
        shape: format!("{k}x{k}"),
        seconds: t,
        gb_per_s: Some(bytes / t / 1e9),
        gflops: None,
        vs_dense: None,
    });
    let mut buf = vec![0f32; k * k];
    let t = best_of(5, || q.dequantize_rows(0, k, &mut buf));
    out.push(QuantLine {
        op: "dequantize -> f32".into(),
        shape: format!("{k}x{k}"),
        seconds: t,
        gb_per_s: Some(bytes / t / 1e9),
        gflops: None,
        vs_dense: None,
    });
    let t = best_of(3, || sink += q.dequantize_bf16()[7] as f32);
    out.push(QuantLine {
        op: "dequantize -> bf16".into(),
        shape: format!("{k}x{k}"),
        seconds: t,
        gb_per_s: Some(bytes / 2.0 / t / 1e9),
        gflops: None,
        vs_dense: None,
    });
    let x = data(m * k, 2);
    for &n in &ns {
        let wd = data(n * k, 3);
        let qw = QuantizedWeight::quantize(&wd, &[n, k], Dtype::F32, opts).expect("valid options");
        let flops = 2.0 * (m * n * k) as f64;
        let shape = format!("[{m}x{k}]·[{n}x{k}]ᵀ");
        let td = best_of(3, || sink += ops::matmul_nt(&x, m, &wd, n, k)[0]);
        let tq = best_of(3, || sink += qw.matmul_t(&x, m)[0]);
        out.push(QuantLine::product(
            "matmul f32 y=x·Wᵀ",
            &shape,
            td,
            flops,
            None,
        ));
        out.push(QuantLine::product(
            "matmul nf4 y=x·Wᵀ",
            &shape,
            tq,
            flops,
            Some(td),
        ));
        let dy = data(m * n, 4);
        let td = best_of(3, || sink += ops::matmul_nn(&dy, m, &wd, n, k)[0]);
        let tq = best_of(3, || sink += qw.matmul(&dy, m)[0]);
        out.push(QuantLine::product(
            "matmul f32 dx=dy·W",
            &shape,
            td,
            flops,
            None,
        ));
        out.push(QuantLine::product(
            "matmul nf4 dx=dy·W",
            &shape,
            tq,
            flops,
            Some(td),
        ));
    }
    out.extend(nf4_bf16_lines(quick, &mut sink));
    std::hint::black_box(sink);
    out
}

/// The 4-bit products in bf16 at the training shapes of `llama-small-1024` (1024 tokens through
/// its q, gate/up and down projections), each next to the product with the same weight held
/// dense in bf16: what decoding the codes into bf16 panels costs. Empty where this CPU has no
/// native bf16 kernel set (the portable route is the f32 product with widening).
fn nf4_bf16_lines(quick: bool, sink: &mut f32) -> Vec<QuantLine> {
    use crate::ops::bf16::{self as b16, Bf16Kernel};
    if !Bf16Kernel::native_available() {
        return Vec::new();
    }
    let (m, shapes): (usize, Vec<(usize, usize)>) = if quick {
        (128, vec![(256, 256), (704, 256)])
    } else {
        (1024, vec![(1024, 1024), (2816, 1024), (1024, 2816)])
    };
    let opts = QuantizeOptions::default();
    let mut out = Vec::new();
    for (n, k) in shapes {
        let wd = data(n * k, 5);
        let mut qw =
            QuantizedWeight::quantize(&wd, &[n, k], Dtype::F32, opts).expect("valid options");
        qw.set_compute_dtype(ComputeDtype::Bf16);
        let wb = b16::round_slice(&wd);
        let flops = 2.0 * (m * n * k) as f64;
        let shape = format!("[{m}x{k}]·[{n}x{k}]ᵀ");
        let x = data(m * k, 6);
        let dy = data(m * n, 7);
        let pairs = [
            (
                "y=x·Wᵀ",
                best_of(5, || *sink += b16::matmul_nt(&x, m, &wb, n, k)[0]),
                best_of(5, || *sink += qw.matmul_t(&x, m)[0]),
            ),
            (
                "dx=dy·W",
                best_of(5, || *sink += b16::matmul_nn(&dy, m, &wb, n, k)[0]),
                best_of(5, || *sink += qw.matmul(&dy, m)[0]),
            ),
        ];
        for (what, td, tq) in pairs {
            let (dense, nf4) = (
                format!("matmul bf16 dense {what}"),
                format!("matmul bf16 nf4 {what}"),
            );
            out.push(QuantLine::product(&dense, &shape, td, flops, None));
            out.push(QuantLine::product(&nf4, &shape, tq, flops, Some(td)));
        }
    }
    out
}

/// One line of the layer benchmark.
#[derive(Debug, Serialize)]
pub struct LayerLine {
    /// dense | lora | dora | qlora | qdora.
    pub kind: String,
    /// out × in.
    pub shape: String,
    /// Tokens.
    pub tokens: usize,
    /// Forward + backward seconds (best of 3).
    pub fwd_bwd_s: f64,
    /// Relative to LoRA on the same base (dense or 4-bit).
    pub vs_lora: f64,
}

/// Forward + backward of one Linear (out × in) on `tokens` rows: frozen base alone, LoRA, DoRA,
/// QLoRA, QDoRA (r = 8).
pub fn layers(quick: bool, dropout: f32, dora_dropout: DoraDropout) -> Vec<LayerLine> {
    let tokens = if quick { 128 } else { 512 };
    let shapes: Vec<(usize, usize)> = if quick {
        vec![(1024, 1024), (2752, 1024)]
    } else {
        vec![(4096, 4096), (11008, 4096)]
    };
    let mut out = Vec::new();
    for (o, i) in shapes {
        let w = data(o * i, 5);
        let x = data(tokens * i, 6);
        let dy = data(tokens * o, 7);
        let q = QuantizedWeight::quantize(&w, &[o, i], Dtype::F32, QuantizeOptions::default())
            .expect("valid options");
        let dense = BaseWeight::Dense { w, out: o, inp: i };
        let quant = BaseWeight::Quant(q);
        let mut times = Vec::new();
        for (name, base, kind) in [
            ("dense", &dense, None),
            ("lora", &dense, Some(AdapterKind::Lora)),
            ("dora", &dense, Some(AdapterKind::Dora)),
            ("qlora", &quant, Some(AdapterKind::Lora)),
            ("qdora", &quant, Some(AdapterKind::Dora)),
        ] {
            let mut l = Linear::new(base.clone(), None);
            l.adapter = kind.map(|kind| {
                let opts = AdapterOptions {
                    kind,
                    r: 8,
                    scaling: 4.0,
                    dropout,
                    dora_dropout,
                };
                LoraAdapter::new(base, &opts, InitLoraWeights::Random, &mut Rng::new(1))
            });
            let t = best_of(3, || {
                let (_, s) = l.forward_train(&x, tokens, &mut Rng::new(2));
                std::hint::black_box(l.backward(s, &x, &dy, tokens));
            });
            times.push((name, t));
        }
        let lora = times[1].1;
        let qlora = times[3].1;
        for (name, t) in times {
            let base = if name.starts_with('q') { qlora } else { lora };
            out.push(LayerLine {
                kind: name.into(),
                shape: format!("{o}x{i}"),
                tokens,
                fwd_bwd_s: t,
                vs_lora: t / base,
            });
        }
    }
    out
}

/// The JSON line of one training benchmark run.
#[derive(Debug, Serialize)]
pub struct TrainLine {
    /// Mode.
    pub mode: String,
    /// Preset name or model folder.
    pub preset: String,
    /// N: parameters of all matmuls including the LM head.
    pub params_matmul: usize,
    /// T: tokens per optimizer step.
    pub tokens_per_step: usize,
    /// Median seconds per step after warm-up.
    pub step_s: f64,
    /// T / step_s.
    pub tokens_per_s: f64,
    /// Model FLOPs per second (4NT or 6NT, plus attention; recomputation not counted).
    pub gflops: f64,
    /// Matmul GFLOP/s (2048³) in this process, in the run's compute dtype (f32 gemm, or the
    /// bf16 kernel set the products take): the higher of the readings just before and just
    /// after the timed steps, so that a slow moment of a shared machine during one reading
    /// does not inflate the MFU.
    pub ceiling_gflops: f64,
    /// The two readings `[before, after]` behind `ceiling_gflops`.
    pub ceiling_readings: [f64; 2],
    /// gflops / ceiling_gflops.
    pub mfu: f64,
    /// Peak resident memory of the process.
    pub peak_rss_mib: f64,
    /// Activation checkpointing on.
    pub gradient_checkpointing: bool,
    /// Batch × sequence.
    pub batch: String,
    /// `lora_dropout`.
    pub lora_dropout: f64,
    /// DoRA's dropout placement (DoRA modes only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dora_dropout: Option<&'static str>,
    /// What the frozen weights' products computed in (`f32`, `bf16`).
    pub compute_dtype: &'static str,
    /// The kernels they took.
    pub kernels: String,
    /// Mean loss of the last step (sanity).
    pub loss: f64,
}

/// Settings of [`train_step`].
#[derive(Debug, Clone)]
pub struct TrainBenchOptions {
    /// Preset name (random weights) or a model folder.
    pub source: String,
    /// Mode.
    pub mode: Mode,
    /// Sequences per step.
    pub batch_size: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Timed steps.
    pub steps: usize,
    /// Activation checkpointing.
    pub gradient_checkpointing: bool,
    /// LoRA dropout.
    pub lora_dropout: f64,
    /// DoRA dropout placement.
    pub dora_dropout: DoraDropout,
    /// Compute dtype of the frozen weights.
    pub compute_dtype: ComputeDtype,
}

/// Real training steps (the `qdora train` code path) on synthetic token ids.
///
/// # Errors
/// Unknown preset / unloadable model, or training errors.
pub fn train_step(o: &TrainBenchOptions) -> crate::train::Result<TrainLine> {
    let cfg = TrainConfig {
        mode: o.mode,
        lora_dropout: o.lora_dropout,
        dora_dropout: o.dora_dropout,
        batch_size: o.batch_size,
        seq_len: o.seq_len,
        gradient_checkpointing: Some(o.gradient_checkpointing),
        lr: 1e-4,
        compute_dtype: o.compute_dtype,
        ..Default::default()
    };
    let ceiling_gflops = || {
        if cfg.compute_dtype.is_bf16() && o.mode != Mode::Full {
            let k = ops::bf16::Bf16Kernel::selected();
            ops::bf16::gemm_gflops(k, (2048, 2048, 2048), 3)
        } else {
            ops::matmul_ceiling_gflops(2048, 3)
        }
    };
    let ceiling_before = ceiling_gflops();
    let mut model: Llama = match random::preset(&o.source) {
        Some(c) => {
            let q = o.mode.quantized().then(|| cfg.quantize_options());
            let mut m = random::random_model(c, q, 0, crate::train::build::frozen_compute(&cfg));
            prepare_model(&mut m, &cfg, &o.source)?;
            m
        }
        None => build_model(std::path::Path::new(&o.source), &cfg)?.0,
    };
    model.ensure_positions(o.seq_len);
    let c = model.config.clone();
    let n_params = c.matmul_params();
    let t = o.batch_size * o.seq_len;
    let mut rng = Rng::new(9);
    let ids: Vec<u32> = (0..t)
        .map(|_| (rng.next_u64() % c.vocab_size as u64) as u32)
        .collect();
    let labels: Vec<i64> = ids.iter().map(|&x| x as i64).collect();
    let batches = vec![Batch {
        ids,
        labels,
        b: o.batch_size,
        t: o.seq_len,
    }];
    let mut opt = AdamW::new(AdamWOptions::default());
    let mut times = Vec::new();
    let mut loss = 0.0;
    for s in 0..o.steps + 1 {
        let t0 = Instant::now();
        loss = optimizer_step(&mut model, &mut opt, &batches, &cfg, (s + 1, 1e-4))?.0;
        if s > 0 || o.steps == 1 {
            times.push(t0.elapsed().as_secs_f64());
        }
        if o.steps == 1 && s == 0 {
            break;
        }
    }
    let peak_rss_mib = crate::sys::peak_rss_mib();
    let ceiling_after = ceiling_gflops();
    let ceiling = ceiling_before.max(ceiling_after);
    let compute = model.compute_dtype();
    times.sort_by(|a, b| a.total_cmp(b));
    let step_s = times[times.len() / 2];
    let per_token = if o.mode == Mode::Full { 6.0 } else { 4.0 };
    let attn = 12.0
        * (o.batch_size
            * c.num_attention_heads
            * o.seq_len
            * o.seq_len
            * c.head_dim
            * c.num_hidden_layers) as f64;
    let flops = per_token * n_params as f64 * t as f64 + attn;
    let gflops = flops / step_s / 1e9;
    Ok(TrainLine {
        mode: o.mode.as_str().into(),
        preset: o.source.clone(),
        params_matmul: n_params,
        tokens_per_step: t,
        step_s,
        tokens_per_s: t as f64 / step_s,
        gflops,
        ceiling_gflops: ceiling,
        ceiling_readings: [ceiling_before, ceiling_after],
        mfu: gflops / ceiling,
        peak_rss_mib,
        gradient_checkpointing: o.gradient_checkpointing,
        batch: format!("{}x{}", o.batch_size, o.seq_len),
        lora_dropout: o.lora_dropout,
        dora_dropout: o.mode.dora().then(|| o.dora_dropout.as_str()),
        compute_dtype: compute.name(),
        kernels: compute.kernels(),
        loss,
    })
}

/// One line of the inference benchmark.
#[derive(Debug, Serialize)]
pub struct GenerateLine {
    /// Model (preset or folder).
    pub model: String,
    /// f32 or nf4 base (as stored or loaded).
    pub weights: String,
    /// What the products computed in (`f32`, `bf16`: a dense base then held in bf16).
    pub compute_dtype: &'static str,
    /// Prompt tokens processed in one forward.
    pub prefill_tokens: usize,
    /// Prefill tokens per second.
    pub prefill_tokens_per_s: f64,
    /// Tokens decoded one at a time with the KV cache.
    pub decode_tokens: usize,
    /// Decode tokens per second.
    pub decode_tokens_per_s: f64,
    /// The matmul weights as stored (the blocks' linears and the head), which every decoded
    /// token reads once.
    pub weight_mib: f64,
    /// `weight_mib` read per second while decoding (GB/s): decoding is bound by it.
    pub decode_weight_gb_per_s: f64,
}

/// Prefill and KV-cached decode speed of a model (a folder or a preset), one line per base
/// in `nf4` (`false`: as stored, f32 for a preset; `true`: quantized to NF4 on load — the only
/// way a `llama2-7b` preset fits in memory).
///
/// # Errors
/// Model loading errors.
pub fn generate(
    source: &str,
    prefill: usize,
    decode: usize,
    nf4: &[bool],
    compute: ComputeDtype,
) -> crate::model::Result<Vec<GenerateLine>> {
    let mut out = Vec::new();
    for &nf4 in nf4 {
        let q = nf4.then(QuantizeOptions::default);
        let mut model = match random::preset(source) {
            Some(c) => random::random_model(c, q, 0, compute.resolve()),
            None => {
                let storage = match q {
                    Some(o) => crate::model::BaseStorage::Quantize(o),
                    None => crate::model::BaseStorage::AsStored,
                };
                crate::model::load(
                    std::path::Path::new(source),
                    &crate::model::LoadOptions {
                        storage,
                        compute: compute.resolve(),
                    },
                )?
            }
        };
        let v = model.config.vocab_size as u64;
        let n = prefill
            .min(
                model
                    .config
                    .max_position_embeddings
                    .saturating_sub(decode + 1),
            )
            .max(1);
        let mut rng = Rng::new(3);
        let ids: Vec<u32> = (0..n).map(|_| (rng.next_u64() % v) as u32).collect();
        let mut cache = model.new_cache();
        let t = Instant::now();
        let mut logits = model.forward_cached(&ids, &mut cache)?;
        let prefill_s = t.elapsed().as_secs_f64();
        let t = Instant::now();
        for _ in 0..decode {
            let next = crate::model::generate::sample(&logits, &Default::default(), &mut rng);
            logits = model.forward_cached(&[next], &mut cache)?;
        }
        let decode_s = t.elapsed().as_secs_f64();
        let weight_bytes = model.matmul_weight_bytes();
        out.push(GenerateLine {
            model: source.to_string(),
            weights: if nf4 { "nf4".into() } else { "f32".into() },
            compute_dtype: model.compute_dtype().name(),
            prefill_tokens: n,
            prefill_tokens_per_s: n as f64 / prefill_s,
            decode_tokens: decode,
            decode_tokens_per_s: decode as f64 / decode_s,
            weight_mib: weight_bytes as f64 / (1024.0 * 1024.0),
            decode_weight_gb_per_s: (weight_bytes * decode) as f64 / decode_s / 1e9,
        });
    }
    Ok(out)
}
