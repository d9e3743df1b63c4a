//! Batches: which sequences a step trains on ([`DataOrder`]: a fresh shuffle per epoch, a pure
//! function of the seed and the epoch, so a resumed run sees the same data) and the flattened
//! micro-batch handed to the model ([`Batch`]).

use super::data::Sequence;
use crate::model::loss::IGNORE_INDEX;
use crate::ops::Rng;

/// One micro-batch: `b` sequences of `t` tokens, flattened row after row.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// (b·t) token ids.
    pub ids: Vec<u32>,
    /// (b·t) labels, -100 where not trained on.
    pub labels: Vec<i64>,
    /// Sequences.
    pub b: usize,
    /// Tokens per sequence.
    pub t: usize,
}

impl Batch {
    /// The sequences `seqs[idx]`, in that order.
    ///
    /// # Panics
    /// If `idx` is empty or the sequences differ in length.
    pub fn gather(seqs: &[Sequence], idx: &[usize]) -> Self {
        let t = seqs[idx[0]].input_ids.len();
        let mut ids = Vec::with_capacity(idx.len() * t);
        let mut labels = Vec::with_capacity(idx.len() * t);
        for &i in idx {
            assert_eq!(seqs[i].input_ids.len(), t, "sequences of one batch differ");
            ids.extend_from_slice(&seqs[i].input_ids);
            labels.extend_from_slice(&seqs[i].labels);
        }
        Batch {
            ids,
            labels,
            b: idx.len(),
            t,
        }
    }

    /// Positions whose next token is a label (what the loss averages over).
    pub fn label_count(&self) -> usize {
        (0..self.b)
            .map(|bi| {
                let row = &self.labels[bi * self.t..(bi + 1) * self.t];
                row.iter().skip(1).filter(|&&l| l != IGNORE_INDEX).count()
            })
            .sum()
    }
}

/// The order in which a run visits `n` sequences: epoch `e` is a shuffle of `0..n` drawn from
/// `(seed, e)`; sample `g` of the run is position `g mod n` of epoch `g / n`. The current
/// epoch's shuffle is kept, so a step costs its batch, not a fresh shuffle per sample.
#[derive(Debug, Clone)]
pub struct DataOrder {
    n: usize,
    seed: u64,
    epoch: Option<usize>,
    perm: Vec<usize>,
}

impl DataOrder {
    /// The order of `n` sequences for `seed`.
    pub fn new(n: usize, seed: u64) -> Self {
        DataOrder {
            n,
            seed,
            epoch: None,
            perm: Vec::new(),
        }
    }

    /// The shuffle of epoch `epoch` (Fisher–Yates from the seed's stream for that epoch).
    fn shuffle(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
        let mut idx: Vec<usize> = (0..n).collect();
        let mut rng = Rng::new(seed).fork(1000 + epoch as u64);
        for i in (1..n).rev() {
            let j = (rng.next_u64() % (i as u64 + 1)) as usize;
            idx.swap(i, j);
        }
        idx
    }

    /// The sequence that sample `g` of the run trains on.
    pub fn sample(&mut self, g: usize) -> usize {
        let epoch = g / self.n;
        if self.epoch != Some(epoch) {
            self.perm = Self::shuffle(self.n, self.seed, epoch);
            self.epoch = Some(epoch);
        }
        self.perm[g % self.n]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_epoch_visits_every_sequence_once_and_reproducibly() {
        let (n, seed) = (13, 7);
        let mut order = DataOrder::new(n, seed);
        let first: Vec<usize> = (0..n).map(|g| order.sample(g)).collect();
        let second: Vec<usize> = (n..2 * n).map(|g| order.sample(g)).collect();
        for epoch in [&first, &second] {
            let mut sorted = epoch.clone();
            sorted.sort();
            assert_eq!(sorted, (0..n).collect::<Vec<_>>());
        }
        assert_ne!(first, second, "each epoch has its own shuffle");
        // a fresh order (a resumed run) asked out of sequence gives the same samples
        let mut again = DataOrder::new(n, seed);
        assert_eq!(again.sample(n + 3), second[3]);
        assert_eq!(again.sample(2), first[2]);
    }

    #[test]
    fn batches_flatten_rows_and_count_labels() {
        let s = |ids: &[u32], labels: &[i64]| Sequence {
            input_ids: ids.to_vec(),
            labels: labels.to_vec(),
        };
        let seqs = [s(&[1, 2, 3], &[1, 2, 3]), s(&[4, 5, 6], &[-100, 5, -100])];
        let b = Batch::gather(&seqs, &[1, 0]);
        assert_eq!(b.ids, vec![4, 5, 6, 1, 2, 3]);
        assert_eq!((b.b, b.t), (2, 3));
        // the first position of each row predicts nothing: 1 + 2
        assert_eq!(b.label_count(), 3);
    }
}
