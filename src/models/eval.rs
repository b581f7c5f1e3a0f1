//! Evaluation: the mean next-token negative log-likelihood of sequences, and perplexity —
//! the numbers `transformers` reports as `loss` (and `exp(loss)`) with `labels = input_ids`.

use super::CausalLm;
use crate::autograd::no_grad;
use crate::backend::Device;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::{CrossEntropyReduction, Tensor};

/// Summed NLL over the predicted tokens (every token but the first of each sequence).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NllReport {
    pub sum_nll: f64,
    pub tokens: usize,
}

impl NllReport {
    pub fn mean_nll(&self) -> f64 {
        self.sum_nll / self.tokens as f64
    }

    pub fn perplexity(&self) -> f64 {
        self.mean_nll().exp()
    }
}

/// Score `seqs` in batches of `batch_size` (right-padded, with a padding mask), returning the
/// summed NLL of predicting token `i` from tokens `0..i` of each sequence.
pub fn sequence_nll(model: &dyn CausalLm, seqs: &[Vec<u32>], batch_size: usize, device: &Device) -> Result<NllReport> {
    sequence_nll_observed(model, seqs, batch_size, device, &mut |_, _| {})
}

/// [`sequence_nll`], calling `progress(sequences_done, sequences)` after each batch.
pub fn sequence_nll_observed(
    model: &dyn CausalLm,
    seqs: &[Vec<u32>],
    batch_size: usize,
    device: &Device,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<NllReport> {
    if batch_size == 0 {
        return Err(Error::InvalidArgument { op: "eval", msg: "batch size must be ≥ 1".into() });
    }
    if seqs.iter().all(|s| s.len() < 2) {
        return Err(Error::InvalidArgument { op: "eval", msg: "need at least one sequence of two or more tokens".into() });
    }
    for (i, s) in seqs.iter().enumerate() {
        model.check_tokens(&format!("eval: sequence {} ({} tokens)", i + 1, s.len()), s, s.len())?;
    }
    let _g = no_grad();
    let mut report = NllReport { sum_nll: 0.0, tokens: 0 };
    // Batches of similar lengths, so a batch is not mostly padding (the sums do not depend on
    // the order).
    let mut sorted: Vec<&Vec<u32>> = seqs.iter().collect();
    sorted.sort_by_key(|s| s.len());
    for (i, batch) in sorted.chunks(batch_size).enumerate() {
        progress((i * batch_size).min(seqs.len()), seqs.len());
        let len = batch.iter().map(|s| s.len()).max().unwrap_or(0);
        if len < 2 {
            continue;
        }
        let b = batch.len();
        let (mut ids, mut keep, mut targets) =
            (Vec::with_capacity(b * len), Vec::with_capacity(b * len), Vec::with_capacity(b * (len - 1)));
        for s in batch {
            ids.extend(s.iter().copied().chain(std::iter::repeat_n(0, len - s.len())));
            keep.extend((0..len).map(|i| if i < s.len() { 1.0f32 } else { 0.0 }));
            targets.extend((1..len).map(|i| if i < s.len() { s[i] as i32 } else { -100 }));
        }
        let padded = batch.iter().any(|s| s.len() < len);
        let keep = Tensor::from_vec(keep, &[b, len], device)?;
        let logits = model.forward(&Tensor::from_vec(ids, &[b, len], device)?, padded.then_some(&keep))?;
        let logits = logits.narrow(1, 0, len - 1)?.to_dtype(DType::F32)?;
        let targets_t = Tensor::from_vec(targets.clone(), &[b, len - 1], device)?;
        report.sum_nll += logits.cross_entropy(&targets_t, -100, CrossEntropyReduction::Sum)?.to_scalar()?;
        report.tokens += targets.iter().filter(|&&t| t != -100).count();
    }
    progress(seqs.len(), seqs.len());
    Ok(report)
}
