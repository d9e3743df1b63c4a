//! Evaluation: the mean loss of a model over sequences, in batches, as `transformers` computes
//! a causal LM's loss (every labelled position, -100 ignored).

use super::batch::Batch;
use super::data::Sequence;
use super::error::Result;
use crate::model::Llama;

/// Mean loss of `model` over `seqs` in batches.
///
/// # Errors
/// Model errors.
pub fn evaluate(model: &mut Llama, seqs: &[Sequence], batch_size: usize) -> Result<f64> {
    let (sum, count) = evaluate_with(model, seqs, batch_size, &mut |_| {})?;
    Ok(sum / count.max(1) as f64)
}

/// Summed loss and counted tokens of `model` over `seqs` in batches; `on_batch(sequences)` is
/// called after each batch (progress bars).
///
/// # Errors
/// Model errors.
pub fn evaluate_with(
    model: &mut Llama,
    seqs: &[Sequence],
    batch_size: usize,
    on_batch: &mut dyn FnMut(usize),
) -> Result<(f64, usize)> {
    let (mut sum, mut count) = (0.0, 0usize);
    let idx: Vec<usize> = (0..seqs.len()).collect();
    for chunk in idx.chunks(batch_size.max(1)) {
        let batch = Batch::gather(seqs, chunk);
        let (s, c) = model.loss(&batch.ids, &batch.labels, batch.b, batch.t)?;
        sum += s;
        count += c;
        on_batch(chunk.len());
    }
    Ok((sum, count))
}
