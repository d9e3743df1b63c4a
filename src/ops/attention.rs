//! The attention core as a kernel: causal scaled-dot-product attention over grouped heads, its
//! backward, and the probability blocks both share. The layer around it
//! (`model::layers::attention`: projections, q/k norms, RoPE) calls [`forward`] and [`backward`]
//! on rows of tokens holding every head side by side.
//!
//! Per sequence `b` and head `h` (group `g = h / (H/Hkv)`): `S = Q_h·K_gᵀ/√Dh` (causal mask,
//! optional sliding window), `P = softmax(S)`, `O_h = P·V_g`. Backward: `dV_g += Pᵀ·dO`,
//! `dP = dO·V_gᵀ`, `dS = P⊙(dP − rowsum(dP⊙P))`, `dQ_h = dS·K_g/√Dh`, `dK_g += dSᵀ·Q_h/√Dh`.
//!
//! The probabilities (B, H, T, T) are kept for backward, or, to save memory, only each row's
//! softmax statistics (B·H·T pairs): the backward then recomputes `P` one query block at a
//! time, to the bit, in scratch that stays in cache (as FlashAttention does), for one more
//! `Q·Kᵀ` product. Each head's results are written straight into its columns of the token rows
//! ([`Bands`]), so no per-head buffer is laid out afterwards.
//!
//! In a bf16-compute run the six products take bf16 operands with f32 sums, as SDPA runs under
//! autocast: q, k, v and the context gradient are rounded to bf16 once per call ([`Rows`]), the
//! probabilities and `dS` as the products pack them; the softmax and its statistics stay f32.

use std::borrow::Cow;
use std::mem::MaybeUninit;

use half::bf16;
use rayon::prelude::*;

use super::bands::Bands;
use super::bf16::{
    from_bits, gemm_bf16, round_slice, to_bits, Bf16Ref, ComputeDtype, PairRows, GEMV_ROWS,
};
use super::kept::Kept;
use super::mat::{gemm, Accum, MatMut, MatRef, Par};
use super::math::{dot, softmax_replay, softmax_scaled};
use super::uninit::{filled, filled_pair};

/// Queries per block in the causal products: a block's keys end at its last query (128:
/// fewer, larger products than 64, which matters with AVX-512 kernels; 256 would skip nothing).
pub const QUERY_BLOCK: usize = 128;

/// The heads of one attention layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heads {
    /// H, query heads.
    pub heads: usize,
    /// Hkv, key/value heads (H is a multiple).
    pub kv_heads: usize,
    /// Dh.
    pub head_dim: usize,
    /// A query sees at most this many keys, itself included (Mistral); `None`: all earlier.
    pub window: Option<usize>,
}

/// `b` sequences of `tq` queries over `tk` keys, query `i` at absolute position `pos0 + i` and
/// the keys at `0..tk` (`pos0 > 0` while decoding after a KV cache).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    /// Sequences.
    pub b: usize,
    /// Queries per sequence.
    pub tq: usize,
    /// Keys per sequence.
    pub tk: usize,
    /// Position of the first query.
    pub pos0: usize,
}

impl Span {
    /// Training's shape: `t` queries over the same `t` keys.
    pub fn square(b: usize, t: usize) -> Self {
        Span {
            b,
            tq: t,
            tk: t,
            pos0: 0,
        }
    }
}

/// Token rows of q, k, v or the context gradient as the products read them: the f32 values, or
/// bf16 ones rounded once (bf16 compute), so that the blocks and heads sharing a key row do
/// not each round it again; borrowed where they are held so already.
enum Rows<'a> {
    F32(Cow<'a, [f32]>),
    Bf16(Cow<'a, [bf16]>),
}

impl<'a> Rows<'a> {
    fn new(v: &'a [f32], c: ComputeDtype) -> Self {
        if c.is_bf16() {
            Rows::Bf16(Cow::Owned(round_slice(v)))
        } else {
            Rows::F32(Cow::Borrowed(v))
        }
    }

    /// Rows saved for backward: a bf16 copy is read as it is (not widened, then rounded again).
    fn kept(v: &'a Kept, c: ComputeDtype) -> Self {
        match (v, c.is_bf16()) {
            (Kept::Bf16(b), true) => Rows::Bf16(Cow::Borrowed(b)),
            (Kept::F32(f), true) => Rows::new(f, c),
            (v, false) => Rows::F32(v.f32()),
        }
    }

    fn is_bf16(&self) -> bool {
        matches!(self, Rows::Bf16(_))
    }

    /// `rows × cols` from element `at`, rows `stride` apart.
    fn mat(&self, at: usize, rows: usize, cols: usize, stride: usize) -> Operand<'_> {
        match self {
            Rows::F32(v) => Operand::F32(MatRef::strided(&v[at..], rows, cols, stride)),
            Rows::Bf16(v) => Operand::Bf16(Bf16Ref::strided(&v[at..], rows, cols, stride)),
        }
    }
}

/// What the products over `queries` query rows a sequence compute in: `c`, except that a few
/// rows (decoding after a KV cache) stay f32. There each key is read once, so rounding the whole
/// cache to bf16 and packing it costs more than the f32 product it replaces (decoding
/// llama-small-1024 had dropped from 36–44 to 29–31 tokens/s).
fn products_in(c: ComputeDtype, queries: usize) -> ComputeDtype {
    if queries <= GEMV_ROWS {
        ComputeDtype::F32
    } else {
        c
    }
}

/// One operand of an attention product.
#[derive(Clone, Copy)]
enum Operand<'a> {
    F32(MatRef<'a>),
    Bf16(Bf16Ref<'a>),
}

impl Operand<'_> {
    /// As an operand of the bf16 products.
    fn pairs(&self) -> &dyn PairRows {
        match self {
            Operand::F32(m) => m,
            Operand::Bf16(m) => m,
        }
    }

    fn t(self) -> Self {
        match self {
            Operand::F32(m) => Operand::F32(m.t()),
            Operand::Bf16(m) => Operand::Bf16(m.t()),
        }
    }
}

impl<'a> From<MatRef<'a>> for Operand<'a> {
    fn from(m: MatRef<'a>) -> Self {
        Operand::F32(m)
    }
}

/// `dst [+]= a·b` on the calling thread: with bf16 operands and f32 sums where `bf16` (f32
/// views rounded as they are packed), else in f32.
///
/// # Panics
/// If an operand is bf16 in an f32 product.
fn product(bf16: bool, dst: MatMut<'_>, acc: Accum, a: Operand<'_>, b: Operand<'_>) {
    if bf16 {
        let lhs_t = a.t();
        gemm_bf16(dst, acc, lhs_t.pairs(), b.pairs(), 1.0, Par::Serial);
    } else {
        match (a, b) {
            (Operand::F32(a), Operand::F32(b)) => gemm(dst, acc, a, b, 1.0, Par::Serial),
            _ => panic!("a bf16 operand in an f32 attention product"),
        }
    }
}

/// What the forward keeps of the probabilities for backward.
pub enum Probs {
    /// (B·H, T, T) the probabilities themselves: f32, or bf16 in a bf16-compute run (see
    /// [`Probs::keep_in`]).
    Kept(Kept),
    /// (B·H·T) each probability row's softmax statistics (see [`softmax_replay`]); where
    /// `bf16`, backward rounds the replayed probabilities to bf16 as kept ones are rounded, so
    /// that a checkpointed run takes the same gradients to the bit.
    Stats {
        /// Two statistics per row.
        stats: Vec<[f32; 2]>,
        /// Whether the block computes in bf16.
        bf16: bool,
    },
}

impl Probs {
    /// Keeps kept probabilities as a run computing in `c` saves them: rounded to bf16 for bf16
    /// (as autocast hands them to the `P·V` product, whose backward saves them so), unchanged
    /// for f32; statistics stay f32. Returns the bytes held.
    pub fn keep_in(&mut self, c: ComputeDtype) -> usize {
        match self {
            Probs::Kept(p) => p.keep_in(c),
            Probs::Stats { stats, bf16 } => {
                *bf16 |= c.is_bf16();
                stats.len() * 8
            }
        }
    }
}

/// How [`probabilities`] takes each row's softmax: fresh (writing the row's statistics) or
/// replayed from the statistics the forward wrote.
enum Softmax<'a> {
    Fresh(&'a mut [[f32; 2]]),
    Replay(&'a [[f32; 2]]),
}

/// One block of probabilities: query rows `q0..q1` of head `hi` of sequence `bi`.
#[derive(Clone, Copy)]
struct Block {
    bi: usize,
    hi: usize,
    q0: usize,
    q1: usize,
}

/// Probabilities of one block over keys `0..tk`, into `sb` ((q1 − q0) × tk): one product
/// `Q·Kᵀ` over the keys the block can see (causal; columns past them and outside a sliding
/// window are set to 0), then the row softmax, fresh or replayed from saved statistics. Returns
/// the block, every element written, and how many key columns (`kend`) it spans.
fn probabilities<'s>(
    hd: &Heads,
    (q, k): (&Rows<'_>, &Rows<'_>),
    span: Span,
    blk: Block,
    sb: &'s mut [MaybeUninit<f32>],
    mut softmax: Softmax<'_>,
) -> (&'s mut [f32], usize) {
    let Heads {
        heads: h,
        kv_heads: hkv,
        head_dim: dh,
        window,
    } = *hd;
    let Span { tq, tk, pos0, .. } = span;
    let Block { bi, hi, q0, q1 } = blk;
    let scale = 1.0 / (dh as f32).sqrt();
    let (qs, ks) = (h * dh, hkv * dh);
    let qo = bi * tq * qs + hi * dh;
    let ko = bi * tk * ks + (hi / (h / hkv)) * dh;
    let kend = (pos0 + q1).min(tk);
    let rows = q1 - q0;
    assert_eq!(sb.len(), rows * tk, "probability block shape");
    {
        let mut s = MatMut::uninit(sb, rows, tk, tk);
        let qm = q.mat(qo + q0 * qs, rows, dh, qs);
        let km = k.mat(ko, kend, dh, ks);
        product(q.is_bf16(), s.columns(0, kend), Accum::Write, qm, km.t());
    }
    for row in sb.chunks_mut(tk) {
        row[kend..].iter_mut().for_each(|x| {
            x.write(0.0);
        });
    }
    // SAFETY: the product wrote columns `..kend` of every row and the loop the rest.
    let sb = unsafe { std::slice::from_raw_parts_mut(sb.as_mut_ptr().cast::<f32>(), sb.len()) };
    for (i, row) in sb.chunks_mut(tk).enumerate() {
        let p = pos0 + q0 + i;
        let lo = window.map_or(0, |w| (p + 1).saturating_sub(w));
        let hi_ = (p + 1).min(tk);
        row[..lo].fill(0.0);
        // columns from `kend` on were zeroed above (`hi_ <= kend`: a query sees no key past its
        // block's last)
        row[hi_..kend].fill(0.0);
        let live = &mut row[lo..hi_];
        match &mut softmax {
            Softmax::Fresh(st) => st[i] = softmax_scaled(live, scale),
            Softmax::Replay(st) => softmax_replay(live, scale, st[i]),
        }
    }
    (sb, kend)
}

/// Attention over `span`: the context (b·tq, H·Dh) for `q` (b·tq, H·Dh) after RoPE and `k`, `v`
/// (b·tk, Hkv·Dh), and what backward needs of the probabilities: all of them with
/// `keep_probs` (b·H, tq, tk), else each row's softmax statistics. The products compute in `c`
/// (f32 for a few query rows, see [`products_in`]).
///
/// # Panics
/// If a slice is too short for its shape.
pub fn forward(
    hd: &Heads,
    (q, k, v): (&[f32], &[f32], &[f32]),
    span: Span,
    keep_probs: bool,
    c: ComputeDtype,
) -> (Vec<f32>, Probs) {
    let Heads {
        heads: h,
        kv_heads: hkv,
        head_dim: dh,
        ..
    } = *hd;
    let Span { b, tq, tk, .. } = span;
    let (qs, ks) = (h * dh, hkv * dh);
    let mut stats = vec![[0f32; 2]; b * h * tq];
    let kept_len = if keep_probs { b * h * tq * tk } else { 0 };
    let c = products_in(c, tq);
    let (q, k, v) = (Rows::new(q, c), Rows::new(k, c), Rows::new(v, c));
    let bf16 = c.is_bf16();
    // SAFETY: head `hi` of sequence `bi` writes columns `hi·dh..+dh` of rows `bi·tq..+tq`
    // (every query block, without accumulating); the heads of all sequences cover `ctx`. With
    // `keep_probs`, each head's query blocks write all of its `tq × tk` probabilities.
    let (ctx, probs) = unsafe {
        filled_pair(b * tq * qs, kept_len, |dst, probs| {
            let ctx = Bands::uninit(dst);
            // One (sequence, head): its probabilities in `s`, the whole head's (`tq × tk`, kept)
            // or one query block's at a time (scratch); its context into `ctx`.
            let head = |bh: usize, st: &mut [[f32; 2]], s: &mut [MaybeUninit<f32>]| {
                let (bi, hi) = (bh / h, bh % h);
                let vo = bi * tk * ks + (hi / (h / hkv)) * dh;
                let whole = s.len() == tq * tk;
                for q0 in (0..tq).step_by(QUERY_BLOCK) {
                    let q1 = (q0 + QUERY_BLOCK).min(tq);
                    let sb = if whole {
                        &mut s[q0 * tk..q1 * tk]
                    } else {
                        &mut s[..(q1 - q0) * tk]
                    };
                    let fresh = Softmax::Fresh(&mut st[q0..q1]);
                    let blk = Block { bi, hi, q0, q1 };
                    let (sb, kend) = probabilities(hd, (&q, &k), span, blk, sb, fresh);
                    let at = (bi * tq + q0) * qs + hi * dh;
                    // this head's columns of this query block's rows (see the SAFETY above)
                    let out = ctx.block(at, q1 - q0, dh, qs);
                    let p = MatRef::strided(sb, q1 - q0, kend, tk);
                    let vm = v.mat(vo, kend, dh, ks);
                    product(bf16, out, Accum::Write, p.into(), vm);
                }
            };
            if keep_probs {
                stats
                    .par_chunks_mut(tq)
                    .zip(probs.par_chunks_mut(tq * tk))
                    .enumerate()
                    .for_each(|(bh, (st, s))| head(bh, st, s));
            } else {
                // scratch for one query block, reused across tasks
                stats.par_chunks_mut(tq).enumerate().for_each_init(
                    || vec![MaybeUninit::uninit(); QUERY_BLOCK.min(tq) * tk],
                    |s, (bh, st)| head(bh, st, s),
                );
            }
        })
    };
    let probs = if keep_probs {
        Probs::Kept(Kept::F32(probs))
    } else {
        Probs::Stats { stats, bf16: false }
    };
    (ctx, probs)
}

/// Gradients of [`forward`] over `b` sequences of `t` tokens (training's square span): `(dq,
/// dk, dv)` for the context gradient `dctx` (b·t, H·Dh), before any inverse RoPE. The products
/// compute in `c`, as the forward's did; `v` is read as it was kept.
///
/// # Panics
/// If a slice is too short for its shape.
pub fn backward(
    hd: &Heads,
    (q, k, v): (&[f32], &[f32], &Kept),
    probs: &Probs,
    dctx: &[f32],
    (b, t): (usize, usize),
    c: ComputeDtype,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let Heads {
        heads: h,
        kv_heads: hkv,
        head_dim: dh,
        ..
    } = *hd;
    let n = b * t;
    let group = h / hkv;
    let scale = 1.0 / (dh as f32).sqrt();
    let (qs, ks) = (h * dh, hkv * dh);
    let span = Span::square(b, t);
    let c = products_in(c, t);
    let (q, k, v) = (Rows::new(q, c), Rows::new(k, c), Rows::kept(v, c));
    let dctx = Rows::new(dctx, c);
    let bf16 = c.is_bf16();
    // Per (sequence, kv group), in parallel: dq of its heads, dk and dv of the group, each
    // written straight into its columns of the token rows. Without kept probabilities, each
    // query block's are recomputed into scratch `p` (reused across tasks).
    let mut dk = vec![0f32; n * ks];
    let mut dv = vec![0f32; n * ks];
    let (dk_all, dv_all) = (Bands::new(&mut dk), Bands::new(&mut dv));
    // SAFETY: the task of (sequence bi, group g) alone writes rows `bi·t..+t` of columns
    // `g·dh..+dh` of `dk`/`dv` and of the columns of its heads `hi·dh..+dh` of `dq`; each head's
    // query blocks write every row of its `dq` columns once, without accumulating.
    let dq = unsafe {
        filled(n * qs, |dst| {
            let dq_all = Bands::uninit(dst);
            (0..b * hkv).into_par_iter().for_each_init(
                || {
                    (
                        vec![MaybeUninit::uninit(); QUERY_BLOCK.min(t) * t],
                        vec![0f32; QUERY_BLOCK.min(t) * t],
                    )
                },
                |(p, dp), bg| {
                    let (bi, g) = (bg / hkv, bg % hkv);
                    let ko = bi * t * ks + g * dh;
                    for hi in g * group..(g + 1) * group {
                        let qo = bi * t * qs + hi * dh;
                        let head = (bi * h + hi) * t;
                        for q0 in (0..t).step_by(QUERY_BLOCK) {
                            let q1 = (q0 + QUERY_BLOCK).min(t);
                            let rows = q1 - q0;
                            // query block q0..q1 sees keys 0..q1 (causal)
                            let kend = q1;
                            let pb: &[f32] = match probs {
                                Probs::Kept(Kept::F32(all)) => {
                                    &all[(head + q0) * t..(head + q1) * t]
                                }
                                // widened (exactly) into the scratch
                                Probs::Kept(Kept::Bf16(all)) => {
                                    let src = &all[(head + q0) * t..(head + q1) * t];
                                    let pb = &mut p[..rows * t];
                                    for (d, s) in pb.iter_mut().zip(src) {
                                        d.write(s.to_f32());
                                    }
                                    // every element of pb was written just above (inside
                                    // the product's unsafe block)
                                    &*(pb as *const [MaybeUninit<f32>] as *const [f32])
                                }
                                Probs::Stats { stats, bf16 } => {
                                    let pb = &mut p[..rows * t];
                                    let st = Softmax::Replay(&stats[head + q0..head + q1]);
                                    let blk = Block { bi, hi, q0, q1 };
                                    let pb = probabilities(hd, (&q, &k), span, blk, pb, st).0;
                                    if *bf16 {
                                        for row in pb.chunks_mut(t) {
                                            for v in &mut row[..kend] {
                                                *v = from_bits(to_bits(*v));
                                            }
                                        }
                                    }
                                    pb
                                }
                            };
                            let dpb = &mut dp[..rows * t];
                            let pm = MatRef::strided(pb, rows, kend, t);
                            let dom = dctx.mat(qo + q0 * qs, rows, dh, qs);
                            let km = k.mat(ko, kend, dh, ks);
                            let vm = v.mat(ko, kend, dh, ks);
                            // dV += Pᵀ·dO (the group's key rows, summed over its heads and
                            // query blocks)
                            // the group's columns of this sequence (see the SAFETY above)
                            let dvb = dv_all.block(ko, kend, dh, ks);
                            product(bf16, dvb, Accum::Add, pm.t().into(), dom);
                            // dP = dO·Vᵀ
                            let dpm = MatMut::strided(dpb, rows, kend, t);
                            product(bf16, dpm, Accum::Write, dom, vm.t());
                            for (pr, dr) in pb.chunks(t).zip(dpb.chunks_mut(t)) {
                                let (pr, dr) = (&pr[..kend], &mut dr[..kend]);
                                let dot = dot(pr, dr);
                                for (d, &pp) in dr.iter_mut().zip(pr) {
                                    *d = pp * (*d - dot) * scale;
                                }
                            }
                            // dQ = dS·K, dK += dSᵀ·Q (scale folded into dS)
                            let dsm = MatRef::strided(dpb, rows, kend, t);
                            // this head's columns of this query block (see the SAFETY above)
                            let dqb = dq_all.block(qo + q0 * qs, rows, dh, qs);
                            product(bf16, dqb, Accum::Write, dsm.into(), km);
                            let qm = q.mat(qo + q0 * qs, rows, dh, qs);
                            // the group's columns of this sequence (see the SAFETY above)
                            let dkb = dk_all.block(ko, kend, dh, ks);
                            product(bf16, dkb, Accum::Add, dsm.t().into(), qm);
                        }
                    }
                },
            )
        })
    };
    (dq, dk, dv)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::Rng;

    /// ‖got − want‖ / ‖want‖.
    fn rel(got: &[f32], want: &[f32]) -> f64 {
        let (mut d, mut w) = (0f64, 0f64);
        for (&g, &x) in got.iter().zip(want) {
            d += (g as f64 - x as f64).powi(2);
            w += (x as f64).powi(2);
        }
        (d / w).sqrt()
    }

    /// The bf16 products follow the f32 ones: each operand is rounded to bf16 (relative error
    /// at most 2⁻⁹), so a product's terms are off by about 2⁻⁸ relative, and sums of many
    /// such terms with random signs stay well within 1 % of the f32 result in norm. The bf16
    /// results must differ from the f32 ones (the bf16 route ran), and backward from replayed
    /// probabilities equals backward from kept ones to the bit in bf16 too. Grouped heads, a
    /// partial second query block, with and without a sliding window.
    #[test]
    fn bf16_products_follow_f32_and_replay_to_the_bit() {
        let (b, t) = (2, QUERY_BLOCK + 37);
        let c16 = ComputeDtype::Bf16;
        for window in [None, Some(50)] {
            let hd = Heads {
                heads: 4,
                kv_heads: 2,
                head_dim: 16,
                window,
            };
            let mut rng = Rng::new(5);
            let mut normal = |len: usize| (0..len).map(|_| rng.normal()).collect::<Vec<f32>>();
            let (qs, ks) = (4 * 16, 2 * 16);
            let (q, k, v) = (normal(b * t * qs), normal(b * t * ks), normal(b * t * ks));
            let dctx = normal(b * t * qs);
            let span = Span::square(b, t);
            let run = |c: ComputeDtype, keep: bool| {
                let (ctx, mut probs) = forward(&hd, (&q, &k, &v), span, keep, c);
                probs.keep_in(c);
                let kept_v = Kept::F32(v.clone());
                let (dq, dk, dv) = backward(&hd, (&q, &k, &kept_v), &probs, &dctx, (b, t), c);
                [ctx, dq, dk, dv]
            };
            let want = run(ComputeDtype::F32, true);
            let got = run(c16, true);
            for (name, (g, w)) in ["ctx", "dq", "dk", "dv"].iter().zip(got.iter().zip(&want)) {
                let e = rel(g, w);
                println!("{name} (window {window:?}): ‖bf16 − f32‖ / ‖f32‖ = {e:.2e}");
                assert!(
                    e < 1e-2 && e > 0.0,
                    "{name} ({window:?}): relative error {e:e}"
                );
            }
            let bits =
                |r: [Vec<f32>; 4]| r.map(|v| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
            assert_eq!(
                bits(got),
                bits(run(c16, false)),
                "replayed, window {window:?}"
            );
        }
    }
}
