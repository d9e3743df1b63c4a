//! [`QuantizedWeight`]: one frozen 4-bit matrix (packed codes + quant state), what a
//! bitsandbytes `Params4bit` holds, with the operations a layer needs on it.

use super::blockwise::{self, check_blocksize, Absmax, QuantType, NESTED_BLOCKSIZE};
use super::error::{Error, Result};
use super::kernels::{self, Packed4};
use super::pairs::Nf4Pairs;
use crate::ops;
use crate::ops::bf16::ComputeDtype;

/// A floating-point storage type: what a weight had before quantization (`quant_state.dtype`,
/// which dequantization rounds to), or what a written checkpoint stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Dtype {
    /// `float32`
    #[default]
    #[value(name = "f32", alias = "float32")]
    F32,
    /// `bfloat16`
    #[value(name = "bf16", alias = "bfloat16")]
    Bf16,
    /// `float16`
    #[value(name = "f16", alias = "float16")]
    F16,
}

impl Dtype {
    /// Parses the torch name (`float32`, `bfloat16`, `float16`).
    ///
    /// # Errors
    /// [`Error::UnsupportedDtype`].
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "float32" | "f32" => Ok(Self::F32),
            "bfloat16" | "bf16" => Ok(Self::Bf16),
            "float16" | "f16" => Ok(Self::F16),
            other => Err(Error::UnsupportedDtype(other.to_string())),
        }
    }

    /// The torch name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::F32 => "float32",
            Self::Bf16 => "bfloat16",
            Self::F16 => "float16",
        }
    }

    /// Rounds an f32 to this dtype (round to nearest even) and back.
    #[inline]
    pub fn round(self, x: f32) -> f32 {
        match self {
            Self::F32 => x,
            Self::Bf16 => half::bf16::from_f32(x).to_f32(),
            Self::F16 => half::f16::from_f32(x).to_f32(),
        }
    }
}

/// How to quantize (the knobs of `BitsAndBytesConfig`).
#[derive(Debug, Clone, Copy)]
pub struct QuantizeOptions {
    /// `bnb_4bit_quant_type`.
    pub quant_type: QuantType,
    /// Elements per absmax block (bitsandbytes default 64).
    pub blocksize: usize,
    /// `bnb_4bit_use_double_quant`.
    pub double_quant: bool,
}

impl Default for QuantizeOptions {
    fn default() -> Self {
        Self {
            quant_type: QuantType::Nf4,
            blocksize: 64,
            double_quant: true,
        }
    }
}

/// The stored pieces of a 4-bit weight, as a bitsandbytes checkpoint holds them (checked for
/// agreement by [`QuantizedWeight::from_parts`]).
#[derive(Debug, Clone)]
pub struct Parts {
    /// Packed codes, first element in the high nibble.
    pub packed: Vec<u8>,
    /// NF4 or FP4.
    pub quant_type: QuantType,
    /// Elements per block.
    pub blocksize: usize,
    /// `quant_state.dtype`.
    pub dtype: Dtype,
    /// Logical shape.
    pub shape: Vec<usize>,
    /// Block scales.
    pub absmax: Absmax,
    /// `quant_map`.
    pub quant_map: [f32; 16],
}

/// A frozen 4-bit matrix of shape `shape` (`[out, in]` for a Linear), stored as bitsandbytes
/// stores it: its [`Parts`] (read through `Deref`, checked to agree when the weight was built)
/// and two tables derived from them once for the kernels.
#[derive(Debug, Clone)]
pub struct QuantizedWeight {
    stored: Parts,
    /// The f32 absmax recovered once, so kernels need not redo the nested dequantization.
    absmax_f32: Vec<f32>,
    /// The code table the kernels use: `quant_map`, except that FP4 code 0b1000 is -0.0 where
    /// bitsandbytes' native sign-bit dequantization would run (the stored map has +0.0 there).
    kernel_code: [f32; 16],
    /// What the products compute in (bitsandbytes' `Linear4bit.compute_dtype`).
    compute: ComputeDtype,
}

/// The stored pieces, read-only: a weight's parts never change after the checks of
/// [`QuantizedWeight::from_parts`].
impl std::ops::Deref for QuantizedWeight {
    type Target = Parts;
    fn deref(&self) -> &Parts {
        &self.stored
    }
}

impl QuantizedWeight {
    /// Quantizes f32 data of `shape` (already converted from `dtype` exactly).
    ///
    /// # Errors
    /// [`Error::UnsupportedBlocksize`].
    pub fn quantize(
        data: &[f32],
        shape: &[usize],
        dtype: Dtype,
        opts: QuantizeOptions,
    ) -> Result<Self> {
        let (packed, absmax) = blockwise::quantize_4bit(data, opts.quant_type, opts.blocksize)?;
        let absmax = if opts.double_quant {
            blockwise::double_quantize(&absmax)
        } else {
            Absmax::Plain(absmax)
        };
        Self::from_parts(
            "<in memory>",
            Parts {
                packed,
                quant_type: opts.quant_type,
                blocksize: opts.blocksize,
                dtype,
                shape: shape.to_vec(),
                absmax,
                quant_map: opts.quant_type.code(),
            },
        )
    }

    /// Assembles a weight from its stored pieces, checking that they agree.
    ///
    /// # Errors
    /// [`Error::Inconsistent`] naming `name` when the byte count, absmax length or nested
    /// lengths do not match the shape and blocksize; [`Error::UnsupportedBlocksize`].
    pub fn from_parts(name: &str, parts: Parts) -> Result<Self> {
        let Parts {
            packed,
            quant_type,
            blocksize,
            dtype,
            shape,
            absmax,
            quant_map,
        } = parts;
        check_blocksize(blocksize)?;
        let bad = |problem: String| Error::Inconsistent {
            name: name.to_string(),
            problem,
        };
        let numel: usize = shape.iter().product();
        if packed.len() != numel.div_ceil(2) {
            return Err(bad(format!(
                "packed weight has {} bytes, shape {:?} needs {}",
                packed.len(),
                shape,
                numel.div_ceil(2)
            )));
        }
        let nblocks = numel.div_ceil(blocksize);
        if absmax.len() != nblocks {
            return Err(bad(format!(
                "absmax has {} entries, shape {:?} with blocksize {} needs {}",
                absmax.len(),
                shape,
                blocksize,
                nblocks
            )));
        }
        if let Absmax::Nested {
            nested_absmax,
            nested_quant_map,
            offset,
            ..
        } = &absmax
        {
            let want = nblocks.div_ceil(NESTED_BLOCKSIZE);
            if nested_absmax.len() != want {
                return Err(bad(format!(
                    "nested_absmax has {} entries, expected {}",
                    nested_absmax.len(),
                    want
                )));
            }
            if nested_quant_map.len() != 256 {
                return Err(bad(format!(
                    "nested_quant_map has {} entries, expected 256",
                    nested_quant_map.len()
                )));
            }
            if !offset.is_finite() {
                return Err(bad(format!("nested_offset {offset} is not finite")));
            }
        }
        let absmax_f32 = absmax.to_f32();
        if let Some(i) = absmax_f32.iter().position(|a| !a.is_finite()) {
            return Err(bad(format!("absmax of block {i} is {}", absmax_f32[i])));
        }
        // bitsandbytes 0.50 on CPU dequantizes with its native kernel (sign-bit FP4, so code
        // 0b1000 gives -0.0) when the element count is a multiple of the blocksize, and with the
        // pure-torch `quant_map` lookup (+0.0) otherwise. Both are zero; we match the bits.
        let mut kernel_code = quant_map;
        let native_path = numel.is_multiple_of(blocksize);
        if quant_type == QuantType::Fp4 && native_path && kernel_code[8] == 0.0 {
            kernel_code[8] = -0.0;
        }
        Ok(Self {
            stored: Parts {
                packed,
                quant_type,
                blocksize,
                dtype,
                shape,
                absmax,
                quant_map,
            },
            absmax_f32,
            kernel_code,
            compute: ComputeDtype::F32,
        })
    }

    /// Number of logical elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Output features (first dimension).
    pub fn rows(&self) -> usize {
        self.shape.first().copied().unwrap_or(1)
    }

    /// Input features (product of the remaining dimensions).
    pub fn cols(&self) -> usize {
        self.shape.iter().skip(1).product()
    }

    /// The f32 absmax per block.
    pub fn absmax_f32(&self) -> &[f32] {
        &self.absmax_f32
    }

    /// Dequantizes to f32 without rounding to `dtype` (what bitsandbytes 0.50's matmul uses with
    /// an f32 compute dtype).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.numel()];
        self.dequantize_rows(0, self.rows(), &mut out);
        out
    }

    /// Dequantizes rows `r0..r1` into `out` (`(r1 - r0) * cols` values).
    ///
    /// # Panics
    /// If `out` has the wrong length or the rows are out of range.
    pub fn dequantize_rows(&self, r0: usize, r1: usize, out: &mut [f32]) {
        assert!(
            r0 <= r1 && r1 <= self.rows(),
            "rows {r0}..{r1} out of range"
        );
        assert_eq!(out.len(), (r1 - r0) * self.cols(), "output length");
        kernels::dequantize_range(
            &self.packed,
            &self.absmax_f32,
            &self.kernel_code,
            self.blocksize,
            r0 * self.cols(),
            out,
        );
    }

    /// `dequantize_4bit` as bitsandbytes returns it: rounded to `quant_state.dtype`, as f32.
    pub fn dequantize_as_stored(&self) -> Vec<f32> {
        let mut out = self.dequantize();
        if self.dtype != Dtype::F32 {
            for v in &mut out {
                *v = self.dtype.round(*v);
            }
        }
        out
    }

    /// Dequantizes to bf16 bits (round to nearest even from the f32 product).
    pub fn dequantize_bf16(&self) -> Vec<u16> {
        use rayon::prelude::*;
        let cols = self.cols().max(1);
        let rows_per = (1 << 14) / cols + 1;
        let mut out = vec![0u16; self.numel()];
        out.par_chunks_mut(rows_per * cols)
            .enumerate()
            .for_each(|(ci, chunk)| {
                let r0 = ci * rows_per;
                let r1 = r0 + chunk.len() / cols;
                let mut buf = vec![0f32; chunk.len()];
                self.dequantize_rows(r0, r1, &mut buf);
                for (o, v) in chunk.iter_mut().zip(&buf) {
                    *o = ops::bf16::to_bits(*v);
                }
            });
        out
    }

    /// The codes, scales and codebook as the 4-bit kernels read them.
    pub(super) fn view(&self) -> Packed4<'_> {
        Packed4 {
            packed: &self.packed,
            absmax: &self.absmax_f32,
            code: &self.kernel_code,
            blocksize: self.blocksize,
            rows: self.rows(),
            cols: self.cols(),
        }
    }

    /// What the products compute in.
    pub fn compute_dtype(&self) -> ComputeDtype {
        self.compute
    }

    /// Sets what the products compute in (`auto` is resolved here).
    pub fn set_compute_dtype(&mut self, c: ComputeDtype) {
        self.compute = c.resolve();
    }

    /// Whether a product of `m` rows takes the bf16 route: bf16 compute, and more rows than
    /// the decoding route reads (a few rows dot the packed codes in f32 directly; packing bf16
    /// panels for them would cost more than the product).
    fn bf16_route(&self, m: usize) -> bool {
        self.compute == ComputeDtype::Bf16 && m > super::gemv::MAX_ROWS
    }

    /// `y = x · Wᵀ (m × out)` for `x` of `m × in`, tiled (the dequantized matrix never exists
    /// whole), in a new vector that is not zeroed first ([`ops::filled`]); in bf16 when the
    /// weight computes in bf16.
    ///
    /// # Panics
    /// If `x.len()` does not match `m`.
    pub fn matmul_t(&self, x: &[f32], m: usize) -> Vec<f32> {
        if self.bf16_route(m) {
            return self.matmul_t_bf16(x, m);
        }
        self.matmul_t_f32(x, m)
    }

    /// [`matmul_t`](Self::matmul_t) in f32 whatever the compute dtype (DoRA's weight norm).
    pub fn matmul_t_f32(&self, x: &[f32], m: usize) -> Vec<f32> {
        // SAFETY: the product writes every element of its output.
        unsafe { ops::uninit::filled(m * self.rows(), |y| self.view().matmul_t(x, m, y)) }
    }

    /// `y = x · Wᵀ` with bf16 operands: the codes decoded straight into bf16 panels.
    fn matmul_t_bf16(&self, x: &[f32], m: usize) -> Vec<f32> {
        ops::bf16::matmul(x, m, &self.bf16_pairs(true))
    }

    /// `W (out × in)` or, `transposed`, `Wᵀ` as a bf16 pair operand, the codes decoded as the
    /// bf16 products decode them: what both bf16 products and PEFT-form DoRA's dropped-element
    /// passes (`ops::bf16::dropped`) read.
    pub fn bf16_pairs(&self, transposed: bool) -> Nf4Pairs<'_> {
        Nf4Pairs::new(self.view(), self.dtype, transposed)
    }

    /// `dx = dy · W` with bf16 operands.
    fn matmul_bf16(&self, dy: &[f32], m: usize) -> Vec<f32> {
        ops::bf16::matmul(dy, m, &self.bf16_pairs(false))
    }

    /// `y = x · Wᵀ` and `y2 = x2 · Wᵀ` (`x2` of `m2 × in`) from one pass of dequantized tiles
    /// (in f32; each on its own route otherwise).
    ///
    /// # Panics
    /// If the lengths do not match `m` and `m2`.
    pub fn matmul_t2(&self, x: &[f32], m: usize, x2: &[f32], m2: usize) -> (Vec<f32>, Vec<f32>) {
        if self.bf16_route(m) || self.bf16_route(m2) {
            return (self.matmul_t(x, m), self.matmul_t(x2, m2));
        }
        let rows = self.rows();
        // SAFETY: the product writes every element of both outputs.
        unsafe {
            ops::uninit::filled_pair(m * rows, m2 * rows, |y, y2| {
                self.view().matmul_t2(x, m, y, Some((x2, m2, y2)))
            })
        }
    }

    /// `dx = dy · W (m × in)` for `dy` of `m × out`, tiled, in a new vector.
    ///
    /// # Panics
    /// If `dy.len()` does not match `m`.
    pub fn matmul(&self, dy: &[f32], m: usize) -> Vec<f32> {
        if self.compute == ComputeDtype::Bf16 {
            return self.matmul_bf16(dy, m);
        }
        // SAFETY: the product writes every element of its output.
        unsafe { ops::uninit::filled(m * self.cols(), |dx| self.view().matmul(dy, m, dx, None)) }
    }

    /// `dx = dy · W` and `dx2 = dy2 · W` (both `m × in`) from one pass of dequantized tiles.
    ///
    /// # Panics
    /// If a length does not match `m`.
    pub fn matmul2(&self, dy: &[f32], dy2: &[f32], m: usize) -> (Vec<f32>, Vec<f32>) {
        if self.compute == ComputeDtype::Bf16 {
            return (self.matmul_bf16(dy, m), self.matmul_bf16(dy2, m));
        }
        let cols = self.cols();
        // SAFETY: the product writes every element of both outputs.
        unsafe {
            ops::uninit::filled_pair(m * cols, m * cols, |dx, dx2| {
                self.view().matmul(dy, m, dx, Some((dy2, dx2)))
            })
        }
    }

    /// The exact JSON string bitsandbytes packs into `quant_state.bitsandbytes__<type>`.
    pub fn quant_state_json(&self) -> String {
        let shape = self
            .shape
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let mut s = format!(
            "{{\"quant_type\": \"{}\", \"blocksize\": {}, \"dtype\": \"{}\", \"shape\": [{}]",
            self.quant_type.as_str(),
            self.blocksize,
            self.dtype.as_str(),
            shape
        );
        if let Absmax::Nested { offset, .. } = &self.absmax {
            s.push_str(&format!(
                ", \"nested_blocksize\": {NESTED_BLOCKSIZE}, \"nested_dtype\": \"float32\", \"nested_offset\": {}",
                python_float_repr(*offset as f64)
            ));
        }
        s.push('}');
        s
    }
}

/// Formats an f64 as Python's `repr(float)` does (shortest round trip; exponent form below 1e-4
/// and from 1e16).
pub fn python_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        };
    }
    if x == 0.0 {
        return if x.is_sign_negative() {
            "-0.0".into()
        } else {
            "0.0".into()
        };
    }
    let sci = format!("{x:e}"); // e.g. "1.2345e-5"
    let (mant, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if !(-4..16).contains(&exp) {
        let sign = if exp < 0 { "-" } else { "+" };
        format!("{mant}e{sign}{:02}", exp.abs())
    } else {
        let s = format!("{x}");
        if s.contains('.') {
            s
        } else {
            format!("{s}.0")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_repr_matches_python() {
        assert_eq!(python_float_repr(0.2604166865348816), "0.2604166865348816");
        assert_eq!(python_float_repr(2.0), "2.0");
        assert_eq!(python_float_repr(1e-5), "1e-05");
        assert_eq!(python_float_repr(0.0001), "0.0001");
        assert_eq!(python_float_repr(1.5e-7), "1.5e-07");
        assert_eq!(python_float_repr(1e16), "1e+16");
    }

    #[test]
    fn inconsistent_parts_are_named_errors() {
        // a 4 × 64 NF4 weight's parts with the given byte count, blocksize and absmax length
        let parts = |bytes: usize, blocksize: usize, blocks: usize| Parts {
            packed: vec![0u8; bytes],
            quant_type: QuantType::Nf4,
            blocksize,
            dtype: Dtype::F32,
            shape: vec![4, 64],
            absmax: Absmax::Plain(vec![1.0; blocks]),
            quant_map: QuantType::Nf4.code(),
        };
        let name = "model.layers.0.q_proj.weight";
        let msg = QuantizedWeight::from_parts(name, parts(10, 64, 4))
            .unwrap_err()
            .to_string();
        assert!(msg.contains(name) && msg.contains("128"), "{msg}");
        let err = QuantizedWeight::from_parts("w", parts(128, 64, 3)).unwrap_err();
        assert!(matches!(err, Error::Inconsistent { .. }));
        assert!(matches!(
            QuantizedWeight::from_parts("w", parts(128, 48, 4)),
            Err(Error::UnsupportedBlocksize(48))
        ));
        assert!(QuantizedWeight::from_parts("w", parts(128, 64, 4)).is_ok());
    }
}
