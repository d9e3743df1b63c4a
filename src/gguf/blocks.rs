//! ggml's storage types that an export writes, encoded byte for byte as ggml's reference
//! quantizers (`quantize_row_q8_0_ref`, `quantize_row_q4_0_ref`; the `gguf` Python package's
//! `quants.py` mirrors them): f32, f16, bf16 (round to nearest even), and the 32-value blocks
//! Q8_0 (an f16 scale `d = absmax / 127`, then 32 × i8 `round(x / d)`) and Q4_0 (an f16 scale
//! `d = x_absmax / -8` from the signed value of largest magnitude, then 16 bytes of 4-bit codes
//! `min(15, trunc(x / d + 8.5))`, value `j` in the low nibble of byte `j`, value `j + 16` in its
//! high nibble).

use half::{bf16, f16};

/// Values per Q8_0 / Q4_0 block.
pub const QK: usize = 32;

/// A ggml tensor type, with its id in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum GgmlType {
    /// 32-bit float.
    F32 = 0,
    /// IEEE half.
    F16 = 1,
    /// 4-bit blocks of 32 with an f16 scale (18 bytes).
    Q4_0 = 2,
    /// 8-bit blocks of 32 with an f16 scale (34 bytes).
    Q8_0 = 8,
    /// bfloat16.
    Bf16 = 30,
}

impl GgmlType {
    /// The type with this id, if it is one qdora writes.
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            8 => Self::Q8_0,
            30 => Self::Bf16,
            _ => return None,
        })
    }

    /// Values per block (1 for the float types).
    pub fn block_len(self) -> usize {
        match self {
            Self::Q4_0 | Self::Q8_0 => QK,
            _ => 1,
        }
    }

    /// Bytes of `n` values (`n` a multiple of [`block_len`](Self::block_len)).
    pub fn row_bytes(self, n: usize) -> usize {
        match self {
            Self::F32 => 4 * n,
            Self::F16 | Self::Bf16 => 2 * n,
            Self::Q8_0 => n / QK * 34,
            Self::Q4_0 => n / QK * 18,
        }
    }

    /// Appends the encoding of `x` (length a multiple of the block length) to `out`.
    ///
    /// # Panics
    /// If `x.len()` is not a multiple of the block length (callers choose the type by it).
    pub fn encode(self, x: &[f32], out: &mut Vec<u8>) {
        assert_eq!(x.len() % self.block_len(), 0, "row of {} values", x.len());
        out.reserve(self.row_bytes(x.len()));
        match self {
            Self::F32 => x.iter().for_each(|v| out.extend(v.to_le_bytes())),
            Self::F16 => x
                .iter()
                .for_each(|v| out.extend(f16::from_f32(*v).to_le_bytes())),
            Self::Bf16 => x
                .iter()
                .for_each(|v| out.extend(bf16::from_f32(*v).to_le_bytes())),
            Self::Q8_0 => x.chunks(QK).for_each(|b| q8_0_block(b, out)),
            Self::Q4_0 => x.chunks(QK).for_each(|b| q4_0_block(b, out)),
        }
    }

    /// Decodes `n` values from `bytes` (the inverse of [`encode`](Self::encode), up to its
    /// rounding).
    pub fn decode(self, bytes: &[u8]) -> Vec<f32> {
        let f16_at = |b: &[u8]| f16::from_le_bytes([b[0], b[1]]).to_f32();
        match self {
            Self::F32 => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Self::F16 => bytes.chunks_exact(2).map(f16_at).collect(),
            Self::Bf16 => bytes
                .chunks_exact(2)
                .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Self::Q8_0 => bytes
                .chunks_exact(34)
                .flat_map(|b| {
                    let d = f16_at(b);
                    b[2..].iter().map(move |q| d * f32::from(*q as i8))
                })
                .collect(),
            Self::Q4_0 => bytes
                .chunks_exact(18)
                .flat_map(|b| {
                    let d = f16_at(b);
                    let q = &b[2..];
                    let lo = q.iter().map(move |c| d * (f32::from(c & 15) - 8.0));
                    let hi = q.iter().map(move |c| d * (f32::from(c >> 4) - 8.0));
                    lo.chain(hi).collect::<Vec<_>>()
                })
                .collect(),
        }
    }
}

fn q8_0_block(x: &[f32], out: &mut Vec<u8>) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d == 0.0 { 0.0 } else { 1.0 / d };
    out.extend(f16::from_f32(d).to_le_bytes());
    // f32::round rounds half away from zero, as C's roundf.
    out.extend(x.iter().map(|v| (v * id).round() as i8 as u8));
}

fn q4_0_block(x: &[f32], out: &mut Vec<u8>) {
    // The signed value of largest magnitude, the first one on ties.
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    let d = max / -8.0;
    let id = if d == 0.0 { 0.0 } else { 1.0 / d };
    out.extend(f16::from_f32(d).to_le_bytes());
    let code = |v: f32| ((v * id + 8.5).trunc() as u8).min(15);
    let half = QK / 2;
    for j in 0..half {
        out.push(code(x[j]) | (code(x[j + half]) << 4));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_error_is_within_a_step() {
        let x: Vec<f32> = (0..64)
            .map(|i| ((i * 37 % 64) as f32 - 30.0) / 7.0)
            .collect();
        // Q8_0: half a step of amax / 127; Q4_0: codes reach -8d but only +7d, so the end
        // opposite the largest value is clipped by up to one step of amax / 8.
        for (t, bound) in [(GgmlType::Q8_0, 0.5 / 127.0), (GgmlType::Q4_0, 1.0 / 8.0)] {
            let mut b = Vec::new();
            t.encode(&x, &mut b);
            assert_eq!(b.len(), t.row_bytes(64));
            let y = t.decode(&b);
            for (blk, yb) in x.chunks(QK).zip(y.chunks(QK)) {
                let amax = blk.iter().fold(0f32, |m, v| m.max(v.abs()));
                for (a, c) in blk.iter().zip(yb) {
                    // plus the f16 rounding of the scale
                    assert!((a - c).abs() <= amax * bound + amax * 2e-3, "{t:?} {a} {c}");
                }
            }
        }
    }

    #[test]
    fn float_types_round_trip() {
        let x = [1.0f32, -2.5, 3.0e-3, 65504.0];
        for t in [GgmlType::F32, GgmlType::F16, GgmlType::Bf16] {
            let mut b = Vec::new();
            t.encode(&x, &mut b);
            let y = t.decode(&b);
            for (a, c) in x.iter().zip(&y) {
                assert!((a - c).abs() <= a.abs() * 4e-3, "{t:?} {a} {c}");
            }
        }
    }
}
