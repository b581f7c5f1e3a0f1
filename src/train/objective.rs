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
    /// The units the loss of `b` is summed over (its denominator in the step's mean).
    fn units(&self, b: &Batch) -> usize;
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

/// Next-token cross-entropy on the target tokens (`-100` elsewhere), per target token.
pub struct LanguageModelling;

impl Objective for LanguageModelling {
    fn name(&self) -> &'static str {
        "language modelling"
    }

    fn units(&self, b: &Batch) -> usize {
        b.n_target_tokens
    }

    fn batch_loss(&self, model: &dyn CausalLm, b: &Batch, _count_correct: bool) -> Result<BatchLoss> {
        if b.labels.is_some() {
            return Err(Error::InvalidArgument { op: "finetune", msg: "labelled data needs a classification objective (a head)".into() });
        }
        let sum = model.forward(&b.ids, b.keep.as_ref())?.cross_entropy(&b.targets, -100, CrossEntropyReduction::Sum)?;
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

    fn units(&self, b: &Batch) -> usize {
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
