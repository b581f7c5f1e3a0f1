//! GRPO (Shao et al. 2024, DeepSeekMath): online RL on prompts with group-relative advantages
//! and no value head, against the adapters-off reference.
//!
//! For each prompt `x` of a batch, `G` completions `o_1..o_G` are sampled from the policy
//! (temperature `T`, the KV cache, decoded as one batch), each scored by a reward model,
//! `r_i = R(x, o_i)`, and given the advantage
//!
//! ```text
//! A_i = (r_i − mean(r)) / (std(r) + 1e-4)        (std with N − 1, as torch's .std())
//! ```
//!
//! The loss of a completion, per token `t` with `ℓ_t = log πθ(o_t | x, o_<t)` and the
//! reference's `ρ_t` (the adapter off), is
//!
//! ```text
//! L_i = (1/|o_i|) Σ_t [ −A_i · exp(ℓ_t − sg(ℓ_t)) + β (e^{ρ_t − ℓ_t} − (ρ_t − ℓ_t) − 1) ]
//! ```
//!
//! the mean over the completions: one policy update per rollout (TRL's default
//! `num_iterations = 1`), where the clipped ratio `exp(ℓ − ℓ_old)` is 1 and its gradient that
//! of `ℓ`, so the clip never acts; the KL penalty is the unbiased `k3` estimator. A
//! completion's gradient per token is `(1/|o_i|)(−A_i + β(1 − e^{ρ_t − ℓ_t}))`.
//!
//! The rewards come from a [`RewardModel`]: a reward model (a one-output head) or a classifier
//! (the probability of one class) on its own copy of the base model, scoring the policy's
//! token ids as they were sampled.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::data::Batch;
use super::objective::{BatchLoss, Objective};
use super::preference::{completion_batch, host_loss};
use crate::autograd::with_no_grad;
use crate::error::{Error, Result};
use crate::models::{CausalLm, GenerateOptions, Sampling};
use crate::peft::ClassifierHead;
use crate::tensor::Tensor;
use crate::Device;

/// GRPO's settings (TRL's names: `num_generations`, `beta`, `max_completion_length`,
/// `temperature`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GrpoConfig {
    /// Completions per prompt, `G ≥ 2`.
    pub group: usize,
    /// The KL penalty's weight.
    pub beta: f64,
    pub max_new_tokens: usize,
    pub temperature: f64,
    /// The token that ends a completion (the tokenizer's EOS).
    pub eos: Option<u32>,
}

impl Default for GrpoConfig {
    fn default() -> Self {
        GrpoConfig { group: 8, beta: 0.04, max_new_tokens: 32, temperature: 1.0, eos: None }
    }
}

impl GrpoConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::InvalidArgument { op: "grpo", msg });
        if self.group < 2 {
            return bad(format!("--num-generations must be at least 2 (advantages are relative to the group), got {}", self.group));
        }
        if !(self.beta >= 0.0 && self.beta.is_finite()) {
            return bad(format!("--beta must be ≥ 0, got {}", self.beta));
        }
        check_sampling("grpo", self.max_new_tokens, self.temperature)
    }
}

/// The sampling settings of an online objective (`op` names it in the error).
pub(crate) fn check_sampling(op: &'static str, max_new_tokens: usize, temperature: f64) -> Result<()> {
    if max_new_tokens == 0 {
        return Err(Error::InvalidArgument { op, msg: "--max-new-tokens must be at least 1".into() });
    }
    if !(temperature > 0.0 && temperature.is_finite()) {
        return Err(Error::InvalidArgument { op, msg: format!("--temperature must be positive, got {temperature}") });
    }
    Ok(())
}

/// A reward for online methods: a head over its own copy of the base model.
pub struct RewardModel {
    model: Box<dyn CausalLm>,
    head: ClassifierHead,
    /// A classifier's class whose probability is the reward (unused for one output).
    label: usize,
    name: String,
    /// How its training data read: a reward model's sequences end with this token (EOS), a
    /// classifier's texts do not; both were cut to `seq_len` tokens.
    eos: Option<u32>,
    seq_len: Option<usize>,
}

impl std::fmt::Debug for RewardModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RewardModel({}, {} outputs, label {})", self.name, self.head.num_classes(), self.label)
    }
}

impl RewardModel {
    /// The adapter directory `dir` (with a head) over the base model at `base`, loaded anew.
    pub fn load(base: &Path, dir: &Path, label: usize, device: &Device, base_dtype: crate::quant::BaseDType) -> Result<RewardModel> {
        let mut model = crate::models::load_with(base, device, base_dtype)?;
        let loaded = crate::peft::format::load(dir, model.as_mut(), device)?;
        let head = loaded.head.ok_or_else(|| Error::InvalidArgument {
            op: "reward model",
            msg: format!("{} has no head: give a reward model or a classifier (an adapter trained with a head)", dir.display()),
        })?;
        let eos = crate::io::Tokenizer::for_model(base).ok().and_then(|t| t.eos_id());
        Ok(RewardModel::new(model, head, label, &dir.display().to_string())?.reading(eos, loaded.seq_len))
    }

    /// Reads sequences as its training data did (see [`RewardModel::score`]): `eos` the
    /// tokenizer's, `seq_len` the length it was trained on.
    pub fn reading(self, eos: Option<u32>, seq_len: Option<usize>) -> RewardModel {
        RewardModel { eos, seq_len, ..self }
    }

    pub fn new(model: Box<dyn CausalLm>, head: ClassifierHead, label: usize, name: &str) -> Result<RewardModel> {
        if head.num_classes() > 1 && label >= head.num_classes() {
            return Err(Error::InvalidArgument {
                op: "reward model",
                msg: format!("{name}: class {label} is not one of its {} classes", head.num_classes()),
            });
        }
        Ok(RewardModel { model, head, label, name: name.to_string(), eos: None, seq_len: None })
    }

    /// Checks that it reads the policy's tokens: the same vocabulary.
    pub fn check_policy(&self, policy: &dyn CausalLm) -> Result<()> {
        if self.model.vocab_size() != policy.vocab_size() {
            return Err(Error::InvalidArgument {
                op: "reward model",
                msg: format!(
                    "{} is over a model of {} tokens, the policy has {}: a reward model must share the policy's base (its tokenizer)",
                    self.name,
                    self.model.vocab_size(),
                    policy.vocab_size()
                ),
            });
        }
        Ok(())
    }

    /// The reward of each token sequence (the policy's ids as sampled, no graph), read as the
    /// scorer's training data was: a reward model's pairs end with EOS, so a sequence without
    /// one gets it; a classifier's labelled texts have none, so a final EOS is dropped; then cut
    /// to the trained length. In padded batches of 16.
    pub fn score(&self, rows: &[Vec<u32>], device: &Device) -> Result<Vec<f64>> {
        if rows.is_empty() || rows.iter().all(Vec::is_empty) {
            return Err(Error::InvalidArgument { op: "reward model", msg: "nothing to score".into() });
        }
        let classes = self.head.num_classes();
        let read: Vec<Vec<u32>> = rows
            .iter()
            .map(|r| {
                let mut r = r.clone();
                match self.eos {
                    Some(e) if classes > 1 && r.len() > 1 && r.last() == Some(&e) => {
                        r.pop();
                    }
                    Some(e) if classes == 1 && r.last() != Some(&e) => r.push(e),
                    _ => {}
                }
                if let Some(n) = self.seq_len {
                    r.truncate(n.max(1));
                }
                r
            })
            .collect();
        let mut out = Vec::with_capacity(rows.len());
        for chunk in read.chunks(16) {
            let flags: Vec<Vec<bool>> = chunk.iter().map(|r| vec![false; r.len()]).collect();
            let seqs: Vec<(&[u32], &[bool])> = chunk.iter().zip(&flags).map(|(r, f)| (&r[..], &f[..])).collect();
            let b = Batch::from_rows(&seqs, 0, device)?;
            let v = with_no_grad(|| {
                // The few logits go to the host (f64 has no GPU kernels); a classifier's softmax there.
                self.head.forward(&self.model.hidden_states(&b.ids, b.keep.as_ref(), None)?, b.keep.as_ref())?.to_vec_f64()
            })?;
            if classes == 1 {
                out.extend(v);
            } else {
                out.extend(v.chunks(classes).map(|c| {
                    let m = c.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = c.iter().map(|x| (x - m).exp()).sum();
                    (c[self.label] - m).exp() / z
                }));
            }
        }
        Ok(out)
    }

    /// The number of outputs of its head (1: a reward model; more: a classifier).
    pub fn outputs(&self) -> usize {
        self.head.num_classes()
    }
}

/// `(r − mean) / (std + 1e-4)` within each group of `group` consecutive rewards.
pub fn group_advantages(rewards: &[f64], group: usize) -> Vec<f64> {
    rewards
        .chunks(group.max(1))
        .flat_map(|g| {
            let n = g.len() as f64;
            let mean = g.iter().sum::<f64>() / n;
            let var = if g.len() > 1 { g.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / (n - 1.0) } else { 0.0 };
            let std = var.sqrt();
            g.iter().map(move |r| (r - mean) / (std + 1e-4)).collect::<Vec<_>>()
        })
        .collect()
}

/// One completion's GRPO loss from its per-token log-probabilities under the policy and the
/// reference: `(loss, ∂loss/∂ℓ_t for each token, mean k3 KL per token)`.
pub fn completion_loss(advantage: f64, logp: &[f64], reference: &[f64], beta: f64) -> (f64, Vec<f64>, f64) {
    let n = logp.len().max(1) as f64;
    let (mut loss, mut kl) = (0.0, 0.0);
    let mut grad = Vec::with_capacity(logp.len());
    for (&l, &r) in logp.iter().zip(reference) {
        let k3 = (r - l).exp() - (r - l) - 1.0;
        loss += -advantage + beta * k3;
        kl += k3;
        grad.push((-advantage + beta * (1.0 - (r - l).exp())) / n);
    }
    (loss / n, grad, kl / n)
}

/// GRPO on a batch of prompts (see the module documentation).
pub struct Grpo {
    pub cfg: GrpoConfig,
    pub reward: Arc<RewardModel>,
    pub seed: u64,
    step: AtomicU64,
}

impl Grpo {
    pub fn new(cfg: GrpoConfig, reward: Arc<RewardModel>, seed: u64) -> Grpo {
        Grpo { cfg, reward, seed, step: AtomicU64::new(0) }
    }
}

impl Objective for Grpo {
    fn name(&self) -> &'static str {
        "grpo"
    }

    /// One unit per completion: the loss is their mean.
    fn units(&self, _model: &dyn CausalLm, b: &Batch) -> usize {
        b.lengths.len() * self.cfg.group
    }

    fn set_step(&self, micro: u64) {
        self.step.store(micro, Ordering::Relaxed);
    }

    fn batch_loss(&self, model: &dyn CausalLm, b: &Batch, _count_correct: bool) -> Result<BatchLoss> {
        if b.pairs.is_some() || b.n_target_tokens > 0 {
            return Err(Error::InvalidArgument { op: "grpo", msg: "GRPO trains on prompts alone ({\"prompt\"} lines)".into() });
        }
        let device = b.ids.device().clone();
        let (t, ids) = (b.ids.shape()[1], b.ids.to_vec::<u32>()?);
        let g = self.cfg.group;
        let micro = self.step.load(Ordering::Relaxed);
        let mut total: Option<Tensor> = None;
        let (mut reward_sum, mut kl_sum, mut length_sum, mut std_sum) = (0.0, 0.0, 0.0, 0.0);
        for (r, &len) in b.lengths.iter().enumerate() {
            let prompt = &ids[r * t..r * t + len];
            let (c, seed) = (&self.cfg, rollout_seed(self.seed, micro, r));
            let completions = sample_completions(model, prompt, g, (c.max_new_tokens, c.temperature, c.eos), seed, &device)?;
            let rows: Vec<Vec<u32>> = completions.iter().map(|c| prompt.iter().chain(c).copied().collect()).collect();
            let rewards = self.reward.score(&rows, &device)?;
            let adv = group_advantages(&rewards, g);
            // Per-token log-probabilities: each position its own row of the chunked output layer.
            let batch = completion_batch(prompt, &completions, &device)?;
            let logp = token_log_probs(model, &batch)?;
            let reference = with_no_grad(|| crate::nn::with_adapters_off(|| token_log_probs(model, &batch)?.to_vec_f64()))?;
            let lp = logp.to_vec_f64()?;
            let width = batch.ids.shape()[1];
            let (mut loss, mut grad) = (0.0, vec![0.0; lp.len()]);
            for (i, c) in completions.iter().enumerate() {
                // Completion token j sits at position prompt.len() + j − 1 of row i.
                let at: Vec<usize> = (0..c.len()).map(|j| i * width + prompt.len() + j - 1).collect();
                let (l, gr, kl) = completion_loss(
                    adv[i],
                    &at.iter().map(|&p| lp[p]).collect::<Vec<_>>(),
                    &at.iter().map(|&p| reference[p]).collect::<Vec<_>>(),
                    self.cfg.beta,
                );
                loss += l;
                kl_sum += kl;
                for (&p, v) in at.iter().zip(gr) {
                    grad[p] = v;
                }
                length_sum += c.len() as f64;
            }
            let mean = rewards.iter().sum::<f64>() / g as f64;
            reward_sum += rewards.iter().sum::<f64>();
            std_sum += g as f64 * (rewards.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (g as f64 - 1.0)).sqrt();
            let part = host_loss(&logp, loss, grad)?;
            total = Some(match total {
                None => part,
                Some(s) => s.add(&part)?,
            });
        }
        let metrics = vec![("reward", reward_sum), ("reward_std", std_sum), ("kl", kl_sum), ("completion_length", length_sum)];
        Ok(BatchLoss { sum: total.expect("a batch has a prompt"), correct: None, metrics, sampled_tokens: length_sum as usize })
    }
}

/// The seed of row `row`'s samples in micro-batch `micro`: a resumed run samples what the
/// uninterrupted one did.
pub(crate) fn rollout_seed(seed: u64, micro: u64, row: usize) -> u64 {
    crate::peft::mix(seed, micro.wrapping_mul(1 << 20).wrapping_add(row as u64))
}

/// `k` completions of `prompt` (`(max_new_tokens, temperature, stop token)`), decoded as one batch.
pub(crate) fn sample_completions(
    model: &dyn CausalLm,
    prompt: &[u32],
    k: usize,
    (max_new_tokens, temperature, eos): (usize, f64, Option<u32>),
    seed: u64,
    device: &Device,
) -> Result<Vec<Vec<u32>>> {
    let opts = GenerateOptions {
        max_new_tokens,
        sampling: Sampling::Sample { temperature, top_k: None, top_p: None },
        repetition_penalty: 1.0,
        seed,
        stop_tokens: eos.into_iter().collect(),
    };
    crate::models::generate_samples(model, prompt, k, &opts, device)
}

/// The log-probability of every position's target, `[rows · T]` (0 where there is none), with
/// the graph when it is recorded.
pub(crate) fn token_log_probs(model: &dyn CausalLm, b: &Batch) -> Result<Tensor> {
    let h = model.forward_hidden(&b.ids, b.keep.as_ref(), None, false)?.last;
    position_log_probs(model, &h, &b.targets)
}

/// The log-probability of each position's target from the final hidden states `h`
/// `[rows, T, d]`, flat `[rows · T]` (0 where the target is −100): each position its own row of
/// the chunked output layer.
pub(crate) fn position_log_probs(model: &dyn CausalLm, h: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let (rows, t, d) = (h.shape()[0], h.shape()[1], h.shape()[2]);
    let per_position = h.reshape(&[(rows * t) as isize, 1, d as isize])?;
    let targets = targets.reshape(&[(rows * t) as isize, 1])?;
    crate::nn::linear_cross_entropy_rows(model.lm_head(), &per_position, &targets, -100)?.neg()
}
