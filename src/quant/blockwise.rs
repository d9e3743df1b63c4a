//! Blockwise absmax 4-bit quantization (NF4 / FP4) and double quantization, bit-compatible with
//! bitsandbytes 0.50 on CPU.
//!
//! Layout (spec §5.2–5.4): the tensor is flattened row-major and cut into consecutive blocks of
//! `blocksize` elements (the last one may be partial). Each block stores its absmax (f32) and one
//! 4-bit code per element, two codes per byte with the *first* element in the *high* nibble.
//! With double quantization the absmax vector minus its mean is itself quantized to 8 bits with
//! the signed dynamic map in blocks of 256, exactly as bitsandbytes' CPU 8-bit quantizer does
//! (a 65,536-bin lookup table that approximates nearest-value rounding).
//!
//! What this file does not do: file formats (`bnb_io.rs`) and matmul kernels (`kernels.rs`).

use std::sync::OnceLock;

use super::codebook::{
    from_bits, DYNAMIC_MAP_BITS, FP4_BOUND_BITS, FP4_CODE_BITS, FP4_SORTED_ORDER, NF4_BOUND_BITS,
    NF4_CODE_BITS,
};
use super::error::{Error, Result};

/// Block size of the nested (double) quantization of absmax, fixed by bitsandbytes.
pub const NESTED_BLOCKSIZE: usize = 256;
/// Number of bins of the CPU 8-bit quantizer's lookup table.
const LUT_BINS: usize = 65536;
/// Smallest absmax used for the reciprocal (bitsandbytes CPU backend clamps to this).
const ABSMAX_FLOOR: f32 = 1e-38;

/// The 4-bit data type: NormalFloat4 or the 1-2-1 float FP4.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum QuantType {
    /// NormalFloat 4 (QLoRA).
    #[default]
    Nf4,
    /// 4-bit float with 2 exponent bits.
    Fp4,
}

impl QuantType {
    /// Parses `"nf4"` / `"fp4"`.
    ///
    /// # Errors
    /// [`Error::UnknownQuantType`] for anything else.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "nf4" => Ok(Self::Nf4),
            "fp4" => Ok(Self::Fp4),
            other => Err(Error::UnknownQuantType(other.to_string())),
        }
    }

    /// The name bitsandbytes uses (`nf4`, `fp4`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Nf4 => "nf4",
            Self::Fp4 => "fp4",
        }
    }

    /// The 16 code values in code order (what bitsandbytes stores as `quant_map`).
    pub fn code(self) -> [f32; 16] {
        match self {
            Self::Nf4 => from_bits(&NF4_CODE_BITS),
            Self::Fp4 => from_bits(&FP4_CODE_BITS),
        }
    }

    /// Code of one normalized value in [-1, 1] (CPU semantics: count of bounds strictly below).
    #[inline]
    fn encode(self, x: f32, bounds: &[f32; 15]) -> u8 {
        let idx = bounds.iter().filter(|&&b| x > b).count();
        match self {
            Self::Nf4 => idx as u8,
            Self::Fp4 => FP4_SORTED_ORDER[idx],
        }
    }

    fn bounds(self) -> [f32; 15] {
        match self {
            Self::Nf4 => from_bits(&NF4_BOUND_BITS),
            Self::Fp4 => from_bits(&FP4_BOUND_BITS),
        }
    }
}

/// Checks that `blocksize` is one bitsandbytes supports.
///
/// # Errors
/// [`Error::UnsupportedBlocksize`] otherwise.
pub fn check_blocksize(blocksize: usize) -> Result<()> {
    if blocksize.is_power_of_two() && (32..=4096).contains(&blocksize) {
        Ok(())
    } else {
        Err(Error::UnsupportedBlocksize(blocksize))
    }
}

/// The per-block scales of a quantized tensor, plain or double-quantized.
#[derive(Debug, Clone, PartialEq)]
pub enum Absmax {
    /// One f32 per block (`weight.absmax` F32).
    Plain(Vec<f32>),
    /// Double quantization: one u8 code per block, one f32 scale per 256 blocks, and an offset.
    Nested {
        /// `weight.absmax` (U8): codes into `nested_quant_map`.
        qabsmax: Vec<u8>,
        /// `weight.nested_absmax` (F32, one per 256 blocks).
        nested_absmax: Vec<f32>,
        /// `weight.nested_quant_map` (F32[256]): the signed dynamic map.
        nested_quant_map: Vec<f32>,
        /// `nested_offset` from the quant-state JSON: the mean of the original absmax.
        offset: f32,
    },
}

impl Absmax {
    /// Number of blocks.
    pub fn len(&self) -> usize {
        match self {
            Absmax::Plain(v) => v.len(),
            Absmax::Nested { qabsmax, .. } => qabsmax.len(),
        }
    }

    /// True when there are no blocks.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The f32 absmax of every block (recovered from the nested codes for double quant):
    /// `map[q] * nested_absmax[i / 256] + offset`, all in f32.
    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            Absmax::Plain(v) => v.clone(),
            Absmax::Nested {
                qabsmax,
                nested_absmax,
                nested_quant_map,
                offset,
            } => qabsmax
                .iter()
                .enumerate()
                .map(|(i, &q)| {
                    nested_quant_map[q as usize] * nested_absmax[i / NESTED_BLOCKSIZE] + offset
                })
                .collect(),
        }
    }
}

/// Quantizes `data` blockwise to 4 bits. Returns the packed bytes (`(n+1)/2`) and the f32 absmax.
///
/// Full blocks are scaled by `x * (1/absmax)`, the partial tail block by `x / absmax` (the two
/// bitsandbytes CPU code paths), values are clamped to [-1, 1], codes chosen by strict `>` on the
/// f32 midpoints, an odd tail is padded with 0.0.
///
/// # Errors
/// [`Error::UnsupportedBlocksize`].
pub fn quantize_4bit(
    data: &[f32],
    quant_type: QuantType,
    blocksize: usize,
) -> Result<(Vec<u8>, Vec<f32>)> {
    check_blocksize(blocksize)?;
    let n = data.len();
    let nblocks = n.div_ceil(blocksize);
    let bounds = quant_type.bounds();
    let mut absmax = vec![0f32; nblocks];
    let mut codes = vec![0u8; n + (n % 2)];
    use rayon::prelude::*;
    codes[..n]
        .par_chunks_mut(blocksize)
        .zip(data.par_chunks(blocksize))
        .zip(absmax.par_iter_mut())
        .for_each(|((out, block), am)| {
            let mut m = 0f32;
            for &v in block {
                m = m.max(v.abs());
            }
            let full = block.len() == blocksize;
            if full {
                *am = m;
                let inv = 1.0 / m.max(ABSMAX_FLOOR);
                for (o, &v) in out.iter_mut().zip(block) {
                    *o = quant_type.encode((v * inv).clamp(-1.0, 1.0), &bounds);
                }
            } else {
                let m = m.max(ABSMAX_FLOOR);
                *am = m;
                for (o, &v) in out.iter_mut().zip(block) {
                    *o = quant_type.encode((v / m).clamp(-1.0, 1.0), &bounds);
                }
            }
        });
    if n % 2 == 1 {
        codes[n] = quant_type.encode(0.0, &bounds);
    }
    let packed = codes.chunks_exact(2).map(|p| (p[0] << 4) | p[1]).collect();
    Ok((packed, absmax))
}

/// Double-quantizes an absmax vector: subtract its mean (computed as torch does), then quantize
/// blockwise (256) to 8 bits with the signed dynamic map using bitsandbytes' CPU lookup table.
pub fn double_quantize(absmax: &[f32]) -> Absmax {
    let offset = torch_mean_f32(absmax);
    let centered: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
    let lut = dynamic_lut();
    let mut qabsmax = Vec::with_capacity(centered.len());
    let mut nested_absmax = Vec::with_capacity(centered.len().div_ceil(NESTED_BLOCKSIZE));
    for block in centered.chunks(NESTED_BLOCKSIZE) {
        let m = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        nested_absmax.push(m);
        let inv = 1.0 / m;
        for &v in block {
            let norm = (v * inv).clamp(-1.0, 1.0);
            let idx = ((norm + 1.0) * (0.5 * 65535.0) + 0.5) as usize;
            qabsmax.push(lut[idx.min(LUT_BINS - 1)]);
        }
    }
    Absmax::Nested {
        qabsmax,
        nested_absmax,
        nested_quant_map: from_bits(&DYNAMIC_MAP_BITS).to_vec(),
        offset,
    }
}

/// bitsandbytes' CPU 8-bit lookup table: bin `i` covers the value `-1 + 2i/65535` and maps to
/// the first code of the sorted dynamic map whose f32 midpoint to the next code is `>=` it.
fn dynamic_lut() -> &'static [u8; LUT_BINS] {
    static LUT: OnceLock<Box<[u8; LUT_BINS]>> = OnceLock::new();
    LUT.get_or_init(|| {
        let mut map = from_bits(&DYNAMIC_MAP_BITS);
        // bitsandbytes sets code[0] = -1 before quantizing so that [-1, 1] is covered.
        map[0] = -1.0;
        let mids: Vec<f32> = map.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect();
        let mut lut = Box::new([0u8; LUT_BINS]);
        let mut j = 0usize;
        for (i, slot) in lut.iter_mut().enumerate() {
            let v = (i as f32) / 65535.0 * 2.0 - 1.0;
            while j < mids.len() && mids[j] < v {
                j += 1;
            }
            *slot = j as u8;
        }
        lut
    })
}

/// The f32 mean of `v` with the summation order of torch's CPU `sum` kernel (8-lane vectors,
/// 4-way ILP, cascade levels of 16), then divided by the length, so that the double-quantization
/// offset matches bitsandbytes bit for bit (single-threaded torch; fixtures were made so).
pub fn torch_mean_f32(v: &[f32]) -> f32 {
    if v.is_empty() {
        return f32::NAN;
    }
    torch_sum_f32(v) / v.len() as f32
}

const LANES: usize = 8;
const ILP: usize = 4;
const LEVELS: usize = 4;

fn torch_sum_f32(v: &[f32]) -> f32 {
    let n = v.len();
    if n < LANES {
        // Scalar path: the same cascade over scalars.
        let acc = row_sum::<1>(|i| [v[i]], n);
        return acc[0];
    }
    let nvec = n / LANES;
    let lanes = row_sum::<LANES>(
        |i| {
            let mut a = [0f32; LANES];
            a.copy_from_slice(&v[i * LANES..(i + 1) * LANES]);
            a
        },
        nvec,
    );
    let mut acc = 0f32;
    for &x in &v[nvec * LANES..] {
        acc += x;
    }
    for l in lanes {
        acc += l;
    }
    acc
}

/// torch `row_sum`: `size` items of W lanes summed with 4-way ILP and a 4-level cascade.
fn row_sum<const W: usize>(load: impl Fn(usize) -> [f32; W], size: usize) -> [f32; W] {
    let size_ilp = size / ILP;
    let ceil_log2 = if size_ilp <= 1 {
        0
    } else {
        usize::BITS - (size_ilp - 1).leading_zeros()
    } as usize;
    let level_power = 4usize.max(ceil_log2 / LEVELS);
    let level_step = 1usize << level_power;
    let level_mask = level_step - 1;
    let mut acc = [[[0f32; W]; ILP]; LEVELS];
    let add = |a: &mut [f32; W], b: &[f32; W]| {
        for (x, y) in a.iter_mut().zip(b) {
            *x += *y;
        }
    };
    let mut i = 0usize;
    while i + level_step <= size_ilp {
        for _ in 0..level_step {
            for k in 0..ILP {
                let x = load(i * ILP + k);
                add(&mut acc[0][k], &x);
            }
            i += 1;
        }
        for j in 1..LEVELS {
            for k in 0..ILP {
                let lower = acc[j - 1][k];
                add(&mut acc[j][k], &lower);
                acc[j - 1][k] = [0f32; W];
            }
            let mask = level_mask << (j * level_power);
            if i & mask != 0 {
                break;
            }
        }
    }
    while i < size_ilp {
        for k in 0..ILP {
            let x = load(i * ILP + k);
            add(&mut acc[0][k], &x);
        }
        i += 1;
    }
    for j in 1..LEVELS {
        for k in 0..ILP {
            let upper = acc[j][k];
            add(&mut acc[0][k], &upper);
        }
    }
    let mut partial = acc[0];
    for idx in size_ilp * ILP..size {
        let x = load(idx);
        add(&mut partial[0], &x);
    }
    for k in 1..ILP {
        let p = partial[k];
        add(&mut partial[0], &p);
    }
    partial[0]
}

/// Reference scalar dequantization: `out[i] = code[c_i] * absmax[i / blocksize]` in f32.
///
/// # Panics
/// If `out` is longer than `2 * packed.len()` or `absmax` has fewer blocks than `out` needs.
pub fn dequantize_4bit_ref(
    packed: &[u8],
    absmax: &[f32],
    code: &[f32; 16],
    blocksize: usize,
    out: &mut [f32],
) {
    for (i, o) in out.iter_mut().enumerate() {
        let byte = packed[i / 2];
        let c = if i % 2 == 0 { byte >> 4 } else { byte & 0x0f };
        *o = code[c as usize] * absmax[i / blocksize];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocksize_validation() {
        for b in [32, 64, 128, 256, 512, 1024, 2048, 4096] {
            assert!(check_blocksize(b).is_ok());
        }
        for b in [0, 16, 48, 8192] {
            assert!(matches!(
                check_blocksize(b),
                Err(Error::UnsupportedBlocksize(_))
            ));
        }
    }

    #[test]
    fn round_trip_error_is_bounded_at_block_edges() {
        for n in [0usize, 1, 63, 64, 65, 4097] {
            let data: Vec<f32> = (0..n)
                .map(|i| ((i * 7919) % 201) as f32 / 100.0 - 1.0)
                .collect();
            for qt in [QuantType::Nf4, QuantType::Fp4] {
                let (packed, absmax) = quantize_4bit(&data, qt, 64).unwrap();
                assert_eq!(packed.len(), n.div_ceil(2));
                let mut out = vec![0f32; n];
                dequantize_4bit_ref(&packed, &absmax, &qt.code(), 64, &mut out);
                // Widest gap between neighbouring codes: NF4 0.3038 (-1..-0.6962), FP4 1/3.
                let half_gap = match qt {
                    QuantType::Nf4 => 0.3039 / 2.0,
                    QuantType::Fp4 => 0.3334 / 2.0,
                };
                for (i, (&x, &y)) in data.iter().zip(&out).enumerate() {
                    let am = absmax[i / 64];
                    assert!(
                        (x - y).abs() <= half_gap * am + 1e-6,
                        "n={n} i={i} {x} vs {y}"
                    );
                }
            }
        }
    }

    #[test]
    fn torch_mean_small_cases() {
        assert_eq!(torch_mean_f32(&[1.0, 2.0, 3.0]), 2.0);
        let v: Vec<f32> = (0..100).map(|i| i as f32).collect();
        assert_eq!(torch_mean_f32(&v), 49.5);
    }
}
