//! What training minimises: one type per objective. The trainer asks an objective for a
//! batch's loss summed over its units (target tokens, or examples) and divides by the units of
//! the whole optimizer step, so gradient accumulation equals one large batch whatever the
//! objective. Language modelling and classification here; the preference objectives (DPO, a
//! reward model) in [`super::preference`].

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
    /// The objective's own metrics, summed over the batch's units (the trainer reports their
    /// means): DPO's `rewards/chosen`, ... .
    pub metrics: Vec<(&'static str, f64)>,
    /// Tokens the objective sampled for the batch (an online objective's completions; the
    /// batch itself holds only their prompts): the step's token count includes them.
    pub sampled_tokens: usize,
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
    /// The micro-batch counter before each training batch (an online objective seeds its
    /// sampling with it, so a resumed run samples what the uninterrupted one did).
    fn set_step(&self, _micro: u64) {}
    /// Optimizer updates per training step on the same micro-batches (PPO's epochs over one
    /// rollout); the learning-rate schedule advances once per step.
    fn updates_per_step(&self) -> usize {
        1
    }
    /// `Some(u)` before each micro-batch of a step's update `u`, `None` once the step is done.
    fn set_update(&self, _update: Option<usize>) {}
    /// Whether the method's dropout is on while training (PPO compares two reads of the policy
    /// and turns it off).
    fn dropout(&self) -> bool {
        true
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
        // In chunks of rows, the logits never whole (nn::xent); the rows without a target skipped.
        let mut sum = crate::nn::linear_cross_entropy_sum(model.lm_head(), &h.last, &b.targets, -100)?;
        if let Some(v) = h.last_virtual {
            // The first real token of each row, predicted by the last virtual one, where the
            // loss covers the start of the example (its second token is a target: plain text,
            // not a prompt of prompt/completion data).
            let (ids, targets) = (b.ids.to_vec::<u32>()?, b.targets.to_vec::<i32>()?);
            let t = b.ids.shape()[1];
            let first: Vec<i32> = (0..b.lengths.len()).map(|r| if targets[r * t] != -100 { ids[r * t] as i32 } else { -100 }).collect();
            let first = Tensor::from_vec(first, &[b.lengths.len(), 1], b.ids.device())?;
            sum = sum.add(&crate::nn::linear_cross_entropy_sum(model.lm_head(), &v, &first, -100)?)?;
        }
        Ok(BatchLoss { sum, correct: None, metrics: Vec::new(), sampled_tokens: 0 })
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
        Ok(BatchLoss {
            sum: logits.cross_entropy(labels, -100, CrossEntropyReduction::Sum)?,
            correct,
            metrics: Vec::new(),
            sampled_tokens: 0,
        })
    }

    fn parameters(&self) -> Vec<(String, Tensor)> {
        self.head.parameters()
    }

    fn head(&self) -> Option<&ClassifierHead> {
        Some(&self.head)
    }
}

/// The class probabilities `softmax(head(pool(hidden)))` of every example of `data`, in order,
/// without gradients or dropout: what `tinytune classify` prints for a trained head.
pub fn class_probabilities(
    model: &dyn CausalLm,
    head: &ClassifierHead,
    data: &super::data::Dataset,
    batch_size: usize,
    device: &crate::Device,
) -> Result<Vec<Vec<f64>>> {
    class_probabilities_observed(model, head, data, batch_size, device, &mut |_, _| {})
}

/// [`class_probabilities`], calling `progress(examples_done, examples)` after each batch.
pub fn class_probabilities_observed(
    model: &dyn CausalLm,
    head: &ClassifierHead,
    data: &super::data::Dataset,
    batch_size: usize,
    device: &crate::Device,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<Vec<f64>>> {
    crate::autograd::with_no_grad(|| {
        // Batches of similar lengths (little padding); the rows go back to the data's order.
        let order = data.by_length();
        let mut out = vec![Vec::new(); data.len()];
        let mut done = 0;
        for chunk in order.chunks(batch_size.max(1)) {
            let b = data.batch(chunk, device)?;
            let logits = head.forward(&model.hidden_states(&b.ids, b.keep.as_ref(), None)?, b.keep.as_ref())?;
            let p = logits.to_device(&crate::Device::Cpu)?.to_dtype(crate::DType::F64)?.softmax(-1)?.to_vec_f64()?;
            for (&i, row) in chunk.iter().zip(p.chunks(head.num_classes())) {
                out[i] = row.to_vec();
            }
            done += chunk.len();
            progress(done, data.len());
        }
        Ok(out)
    })
}

/// Zero-shot classification by the language model itself: for each label, the log-likelihood
/// `Σ log p(label token | prompt, earlier label tokens)` of the label's tokens after `prompt`,
/// and their softmax over the labels. `labels[i]` are the token ids of label i (as they follow
/// the prompt, e.g. " positive"). Returns `(log_likelihoods, probabilities)`.
pub fn label_scores(model: &dyn CausalLm, prompt: &[u32], labels: &[Vec<u32>], device: &crate::Device) -> Result<(Vec<f64>, Vec<f64>)> {
    if prompt.is_empty() || labels.is_empty() || labels.iter().any(Vec::is_empty) {
        return Err(Error::InvalidArgument { op: "classify", msg: "need a prompt and labels of at least one token each".into() });
    }
    let len = prompt.len() + labels.iter().map(Vec::len).max().unwrap_or(0);
    model.check_tokens(
        "classify: the prompt and the longest label",
        &prompt.iter().chain(labels.iter().flatten()).copied().collect::<Vec<_>>(),
        len,
    )?;
    crate::autograd::with_no_grad(|| {
        let b = labels.len();
        let (mut ids, mut keep) = (Vec::with_capacity(b * len), Vec::with_capacity(b * len));
        for l in labels {
            let seq: Vec<u32> = prompt.iter().chain(l).copied().collect();
            keep.extend((0..len).map(|i| if i < seq.len() { 1.0f32 } else { 0.0 }));
            ids.extend(seq.iter().copied().chain(std::iter::repeat_n(0, len - seq.len())));
        }
        let keep = Tensor::from_vec(keep, &[b, len], device)?;
        let logits = model.forward(&Tensor::from_vec(ids, &[b, len], device)?, Some(&keep))?;
        let logp = logits.to_device(&crate::Device::Cpu)?.to_dtype(crate::DType::F64)?.log_softmax(-1)?;
        let v = logp.shape()[2];
        let logp = logp.to_vec_f64()?;
        // Label token j of sequence i is predicted at position prompt.len() + j - 1.
        let scores: Vec<f64> = labels
            .iter()
            .enumerate()
            .map(|(i, l)| l.iter().enumerate().map(|(j, &tok)| logp[(i * len + prompt.len() + j - 1) * v + tok as usize]).sum())
            .collect();
        let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = scores.iter().map(|s| (s - max).exp()).sum();
        let probs = scores.iter().map(|s| (s - max).exp() / z).collect();
        Ok((scores, probs))
    })
}
