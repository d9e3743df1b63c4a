//! [`Kept`]: an activation held from the training forward until its backward, in f32 as it was
//! computed or, in a bf16-compute run, rounded to bf16 — half the memory, and what PyTorch
//! autocast saves for a bf16 product's backward.
//!
//! A layer builds its saved state in f32 (its own forward reads it at full precision), and the
//! block calls [`Kept::keep_in`] once its forward is done. Backward reads the values back as
//! f32: borrowed when they stayed f32 (the f32 path is unchanged to the bit), widened (exactly)
//! into a temporary when they were rounded.

use std::borrow::Cow;

use super::bf16::{round_slice, widen_slice, ComputeDtype};
use half::bf16;

/// An activation saved for backward.
#[derive(Debug, Clone)]
pub enum Kept {
    /// As computed.
    F32(Vec<f32>),
    /// Rounded to bf16 (nearest even).
    Bf16(Vec<bf16>),
}

impl From<Vec<f32>> for Kept {
    fn from(v: Vec<f32>) -> Self {
        Kept::F32(v)
    }
}

impl Default for Kept {
    fn default() -> Self {
        Kept::F32(Vec::new())
    }
}

impl Kept {
    /// Elements held.
    pub fn len(&self) -> usize {
        match self {
            Kept::F32(v) => v.len(),
            Kept::Bf16(v) => v.len(),
        }
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        match self {
            Kept::F32(v) => v.len() * 4,
            Kept::Bf16(v) => v.len() * 2,
        }
    }

    /// Stores the values as a run computing in `c` saves them: rounded to bf16 for bf16 (the
    /// f32 buffer is freed), unchanged for f32. Never widens back. Returns the bytes held.
    pub fn keep_in(&mut self, c: ComputeDtype) -> usize {
        if let (Kept::F32(v), true) = (&*self, c.is_bf16()) {
            *self = Kept::Bf16(round_slice(v));
        }
        self.bytes()
    }

    /// The values as f32: borrowed when held in f32, widened into a new buffer otherwise.
    pub fn f32(&self) -> Cow<'_, [f32]> {
        match self {
            Kept::F32(v) => Cow::Borrowed(v),
            Kept::Bf16(v) => Cow::Owned(widen_slice(v)),
        }
    }

    /// The values as an owned f32 buffer (for a backward that writes over them).
    pub fn into_f32(self) -> Vec<f32> {
        match self {
            Kept::F32(v) => v,
            Kept::Bf16(v) => widen_slice(&v),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// f32 stays f32 and is lent, not copied; bf16 holds the rounded values, widened back
    /// exactly, in half the bytes; keeping in f32 or twice changes nothing.
    #[test]
    fn keeps_in_the_compute_dtype() {
        let v: Vec<f32> = (0..(1 << 15) + 7)
            .map(|i| (i as f32 * 0.37).sin() * 1e3)
            .collect();
        let mut k = Kept::from(v.clone());
        k.keep_in(ComputeDtype::F32);
        assert!(matches!(k.f32(), Cow::Borrowed(_)));
        assert_eq!(k.f32().as_ref(), v.as_slice());
        assert_eq!(k.bytes(), v.len() * 4);
        k.keep_in(ComputeDtype::Bf16);
        k.keep_in(ComputeDtype::Bf16);
        k.keep_in(ComputeDtype::F32);
        assert_eq!(k.bytes(), v.len() * 2);
        let want: Vec<f32> = v.iter().map(|&x| bf16::from_f32(x).to_f32()).collect();
        assert_eq!(k.f32().as_ref(), want.as_slice());
        assert_eq!(k.len(), v.len());
        assert_eq!(k.into_f32(), want);
        assert!(Kept::default().is_empty());
    }
}
