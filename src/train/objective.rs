//! What training minimises: one type per objective. The trainer asks an objective for a
//! batch's loss summed over its units (target tokens, or examples) and divides by the units of
//! the whole optimizer step, so gradient accumulation equals one large batch whatever the
//! objective. Language modelling and classification today; a preference objective (DPO, a
//! reward model) is one more type.

use super::data::Batch;
use crate::error::{Error, Result};
use crate::models::CausalLm;
use crate::peft::{head, ClassifierHead};
use crate::tensor::{CrossEntropyReduction, Tensor};

/// A batch's loss, summed over its units.
pub struct BatchLoss {
    pub sum: Tensor,
    /// Correct predictions, where the objective has them and they were asked for.
    pub correct: Option<usize>,
}

pub trait Objective: Send + Sync {
    fn name(&self) -> &'static str;
    /// The units the loss of `b` on `model` is summed over (its denominator in the step's mean).
    fn units(&self, model: &dyn CausalLm, b: &Batch) -> usize;
    /// The loss of `b` summed over its units; with `count_correct`, the correct predictions.
    fn batch_loss(&self, model: &dyn CausalLm, b: &Batch, count_correct: bool) -> Result<BatchLoss>;
    /// Trainable tensors the objective owns (a classification head), by adapter key.
    fn parameters(&self) -> Vec<(String, Tensor)> {
        Vec::new()
    }
    /// The classification head, when the objective has one (it is saved with the adapter).
    fn head(&self) -> Option<&ClassifierHead> {
        None
    }
}

/// Next-token cross-entropy on the target tokens (`-100` elsewhere), per target token. With
/// virtual tokens before the input (prompt tuning) the last of them predicts the first real
/// token, which is scored too, as PEFT does.
pub struct LanguageModelling;

/// Whether `model` puts virtual tokens before a fresh input.
fn has_virtual_tokens(model: &dyn CausalLm) -> bool {
    !model.decoder().inputs.is_empty() && crate::nn::adapters_enabled()
}

impl Objective for LanguageModelling {
    fn name(&self) -> &'static str {
        "language modelling"
    }

    fn units(&self, model: &dyn CausalLm, b: &Batch) -> usize {
        let first_scored = || {
            let t = b.ids.shape()[1];
            b.targets.to_vec::<i32>().map_or(0, |v| (0..b.lengths.len()).filter(|r| v[r * t] != -100).count())
        };
        b.n_target_tokens + if has_virtual_tokens(model) { first_scored() } else { 0 }
    }

    fn batch_loss(&self, model: &dyn CausalLm, b: &Batch, _count_correct: bool) -> Result<BatchLoss> {
        if b.labels.is_some() {
            return Err(Error::InvalidArgument { op: "finetune", msg: "labelled data needs a classification objective (a head)".into() });
        }
        let h = model.forward_hidden(&b.ids, b.keep.as_ref(), None, false)?;
        let mut sum = model.lm_head().forward(&h.last)?.cross_entropy(&b.targets, -100, CrossEntropyReduction::Sum)?;
        if let Some(v) = h.last_virtual {
            // The first real token of each row, predicted by the last virtual one, where the
            // loss covers the start of the example (its second token is a target: plain text,
            // not a prompt of prompt/completion data).
            let (ids, targets) = (b.ids.to_vec::<u32>()?, b.targets.to_vec::<i32>()?);
            let t = b.ids.shape()[1];
            let first: Vec<i32> = (0..b.lengths.len()).map(|r| if targets[r * t] != -100 { ids[r * t] as i32 } else { -100 }).collect();
            let first = Tensor::from_vec(first, &[b.lengths.len(), 1], b.ids.device())?;
            sum = sum.add(&model.lm_head().forward(&v)?.cross_entropy(&first, -100, CrossEntropyReduction::Sum)?)?;
        }
        Ok(BatchLoss { sum, correct: None })
    }
}

/// Cross-entropy of a classification head on the pooled hidden states, per example.
pub struct Classification {
    pub head: ClassifierHead,
}

impl Objective for Classification {
    fn name(&self) -> &'static str {
        "classification"
    }

    fn units(&self, _model: &dyn CausalLm, b: &Batch) -> usize {
        b.lengths.len()
    }

    fn batch_loss(&self, model: &dyn CausalLm, b: &Batch, count_correct: bool) -> Result<BatchLoss> {
        let labels = b.labels.as_ref().ok_or_else(|| Error::InvalidArgument {
            op: "finetune",
            msg: "a classification head needs labelled data ({\"text\", \"label\"} lines)".into(),
        })?;
        let logits = self.head.forward(&model.hidden_states(&b.ids, b.keep.as_ref(), None)?, b.keep.as_ref())?;
        let correct = if count_correct { Some(head::correct(&logits, labels)?) } else { None };
        Ok(BatchLoss { sum: logits.cross_entropy(labels, -100, CrossEntropyReduction::Sum)?, correct })
    }

    fn parameters(&self) -> Vec<(String, Tensor)> {
        self.head.parameters()
    }

    fn head(&self) -> Option<&ClassifierHead> {
        Some(&self.head)
    }
}
