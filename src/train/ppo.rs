//! PPO for RLHF (Ouyang et al. 2022; TRL's `PPOTrainer` conventions) on prompts, with a value
//! head on the policy's own final hidden states and the adapters-off model as the reference.
//!
//! One training step is one rollout: a completion of each prompt of the step's micro-batches is
//! sampled (the KV cache, temperature `T`), scored by a [`RewardModel`], and read once without a
//! graph for the policy's log-probabilities `ℓ_old`, the values `V_old` and the reference's
//! log-probabilities; rewards, advantages and returns follow from them (below), and the
//! advantages are whitened over the micro-batch's completion tokens. Then `epochs` optimizer
//! updates run on that same rollout (the trainer repeats the step's micro-batches, see
//! [`super::Objective::updates_per_step`]), each with the clipped losses on fresh log-probs and
//! values. The learning-rate schedule advances once per rollout, as TRL's does. A completion's
//! loss is the mean over its tokens of `policy + vf_coef · value`, and the step's the mean over
//! the completions (TRL takes the mean over all tokens of the minibatch; the two agree when
//! completions have one length). Dropout is off throughout: the ratio compares two reads of the
//! same policy.
//!
//! Per-token rewards: the KL penalty against the reference on every token, the reward model's
//! score added on the last one,
//!
//! ```text
//! r_t = −kl_coef · (log π(o_t) − log π_ref(o_t)) + [t = n−1] · score
//! ```
//!
//! Generalised advantage estimation (Schulman et al. 2016) backwards from the last token, with
//! `V(s_n) = 0`:
//!
//! ```text
//! δ_t = r_t + γ V(s_{t+1}) − V(s_t),   A_t = δ_t + γλ A_{t+1},   R_t = A_t + V(s_t)
//! ```
//!
//! The clipped losses, per token, averaged over the tokens (`ρ_t = exp(ℓ_t − ℓ_old,t)`):
//!
//! ```text
//! policy: max(−A_t ρ_t, −A_t clip(ρ_t, 1 − ε, 1 + ε))
//! value:  ½ max((V_t − R_t)², (clip(V_t, V_old,t − ε_v, V_old,t + ε_v) − R_t)²)
//! ```

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::data::Batch;
use super::grpo::{position_log_probs, rollout_seed, sample_completions, token_log_probs, RewardModel};
use super::objective::{BatchLoss, Objective};
use super::preference::{host_loss, prompt_completion_batch};
use crate::autograd::with_no_grad;
use crate::error::{Error, Result};
use crate::models::CausalLm;
use crate::nn::{Linear, COMPUTE};
use crate::rng::Rng;
use crate::tensor::Tensor;

/// TRL's defaults: `kl_coef 0.05`, `cliprange 0.2`, `cliprange_value 0.2`, `vf_coef 0.1`,
/// `gamma 1`, `lam 0.95`, 4 epochs; completions of up to 32 tokens at temperature 1 (the
/// policy's own distribution, which the log-probabilities are read from).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PpoConfig {
    pub kl_coef: f64,
    pub cliprange: f64,
    pub cliprange_value: f64,
    pub vf_coef: f64,
    pub gamma: f64,
    pub lam: f64,
    /// Optimizer updates per rollout.
    pub epochs: usize,
    pub max_new_tokens: usize,
    pub temperature: f64,
    /// The token that ends a completion (the tokenizer's EOS).
    pub eos: Option<u32>,
}

impl Default for PpoConfig {
    fn default() -> Self {
        PpoConfig {
            kl_coef: 0.05,
            cliprange: 0.2,
            cliprange_value: 0.2,
            vf_coef: 0.1,
            gamma: 1.0,
            lam: 0.95,
            epochs: 4,
            max_new_tokens: 32,
            temperature: 1.0,
            eos: None,
        }
    }
}

impl PpoConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::InvalidArgument { op: "ppo", msg });
        let unit = 0.0..=1.0;
        if !(self.kl_coef >= 0.0 && self.kl_coef.is_finite()) {
            return bad(format!("--kl-coef must be ≥ 0, got {}", self.kl_coef));
        }
        if !(self.cliprange > 0.0 && self.cliprange_value > 0.0) {
            return bad(format!("the clip ranges must be positive, got {} and {}", self.cliprange, self.cliprange_value));
        }
        if !(self.vf_coef >= 0.0 && self.vf_coef.is_finite()) {
            return bad(format!("--vf-coef must be ≥ 0, got {}", self.vf_coef));
        }
        if !unit.contains(&self.gamma) || !unit.contains(&self.lam) {
            return bad(format!("gamma and lam must lie in [0, 1], got {} and {}", self.gamma, self.lam));
        }
        if self.epochs == 0 {
            return bad("--ppo-epochs must be at least 1".into());
        }
        super::grpo::check_sampling("ppo", self.max_new_tokens, self.temperature)
    }
}

/// The per-token rewards of one completion (see the module documentation).
pub fn token_rewards(score: f64, logp: &[f64], ref_logp: &[f64], kl_coef: f64) -> Vec<f64> {
    let n = logp.len();
    (0..n).map(|t| -kl_coef * (logp[t] - ref_logp[t]) + if t + 1 == n { score } else { 0.0 }).collect()
}

/// GAE advantages and returns `(A, R)` of one completion from its per-token rewards and values.
pub fn gae(rewards: &[f64], values: &[f64], gamma: f64, lam: f64) -> (Vec<f64>, Vec<f64>) {
    let n = rewards.len();
    let mut adv = vec![0.0; n];
    let mut next = 0.0;
    for t in (0..n).rev() {
        let v_next = if t + 1 < n { values[t + 1] } else { 0.0 };
        let delta = rewards[t] + gamma * v_next - values[t];
        next = delta + gamma * lam * next;
        adv[t] = next;
    }
    let returns = adv.iter().zip(values).map(|(a, v)| a + v).collect();
    (adv, returns)
}

/// The clipped policy loss of one token and its gradient with respect to `logp`
/// (the gradient is 0 where the clipped branch is the larger).
pub fn policy_loss(logp: f64, old_logp: f64, advantage: f64, cliprange: f64) -> (f64, f64) {
    let ratio = (logp - old_logp).exp();
    let unclipped = -advantage * ratio;
    let clipped = -advantage * ratio.clamp(1.0 - cliprange, 1.0 + cliprange);
    if unclipped >= clipped {
        (unclipped, -advantage * ratio)
    } else {
        (clipped, 0.0)
    }
}

/// The clipped value loss of one token and its gradient with respect to `value`.
pub fn value_loss(value: f64, old_value: f64, ret: f64, cliprange_value: f64) -> (f64, f64) {
    let clipped_v = value.clamp(old_value - cliprange_value, old_value + cliprange_value);
    let (a, b) = ((value - ret).powi(2), (clipped_v - ret).powi(2));
    if a >= b {
        (0.5 * a, value - ret)
    } else {
        // The clipped branch: its gradient flows only while the value is inside the clip.
        let inside = (old_value - cliprange_value..=old_value + cliprange_value).contains(&value);
        (0.5 * b, if inside { clipped_v - ret } else { 0.0 })
    }
}

/// Whitens `x` in place to mean 0 and variance 1 (unbiased), as TRL's `masked_whiten`; fewer
/// than two values are only centred.
pub fn whiten(x: &mut [f64]) {
    let n = x.len() as f64;
    if x.is_empty() {
        return;
    }
    let mean = x.iter().sum::<f64>() / n;
    let scale = if x.len() > 1 {
        let var = x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
        1.0 / (var + 1e-8).sqrt()
    } else {
        1.0
    };
    for v in x.iter_mut() {
        *v = (*v - mean) * scale;
    }
}

/// One micro-batch's rollout: what the updates on it read.
struct Rollout {
    /// The rows `prompt + completion`, targets on the completion.
    batch: Batch,
    /// Each completion's token positions in the flat `[rows · T]` layout.
    at: Vec<Vec<usize>>,
    old_logp: Vec<f64>,
    old_values: Vec<f64>,
    /// Per completion, per token (whitened over the micro-batch).
    advantages: Vec<Vec<f64>>,
    returns: Vec<Vec<f64>>,
    /// Summed over the completions: score, KL (Σ_t ℓ − ℓ_ref per completion), tokens.
    score: f64,
    kl: f64,
    tokens: f64,
}

/// PPO on a batch of prompts (see the module documentation).
pub struct Ppo {
    pub cfg: PpoConfig,
    pub reward: Arc<RewardModel>,
    /// `V(s_t) = w·h_t + b` on the final hidden state before each completion token.
    value: Linear,
    seed: u64,
    step: AtomicU64,
    /// `Some(u)` inside a training step's update `u`; `None` outside (evaluation).
    update: Mutex<Option<usize>>,
    rollouts: Mutex<HashMap<u64, Arc<Rollout>>>,
}

impl Ppo {
    /// A fresh value head (`N(0, 0.02²)` weights, zero bias) for a model of width `d`.
    pub fn new(cfg: PpoConfig, reward: Arc<RewardModel>, d: usize, seed: u64, device: &crate::Device) -> Result<Ppo> {
        let mut rng = Rng::new(crate::peft::mix(seed, 0x7A1E));
        let w = Tensor::randn(&[1, d], 0.0, 0.02, COMPUTE, device, &mut rng)?.requires_grad()?;
        let b = Tensor::zeros(&[1], COMPUTE, device)?.requires_grad()?;
        Ok(Ppo {
            cfg,
            reward,
            value: Linear::new("value_head", w, Some(b)),
            seed,
            step: AtomicU64::new(0),
            update: Mutex::new(None),
            rollouts: Mutex::new(HashMap::new()),
        })
    }

    /// Per-position log-probabilities and values of `b`'s rows, flat `[rows · T]`.
    fn read(&self, model: &dyn CausalLm, b: &Batch) -> Result<(Tensor, Tensor)> {
        let h = model.forward_hidden(&b.ids, b.keep.as_ref(), None, false)?.last;
        let n = (h.shape()[0] * h.shape()[1]) as isize;
        Ok((position_log_probs(model, &h, &b.targets)?, self.value.forward(&h)?.reshape(&[n])?))
    }

    fn rollout(&self, model: &dyn CausalLm, b: &Batch, micro: u64) -> Result<Rollout> {
        let device = b.ids.device().clone();
        let (t, ids) = (b.ids.shape()[1], b.ids.to_vec::<u32>()?);
        let prompts: Vec<&[u32]> = b.lengths.iter().enumerate().map(|(r, &len)| &ids[r * t..r * t + len]).collect();
        let mut completions = Vec::with_capacity(prompts.len());
        for (r, prompt) in prompts.iter().enumerate() {
            let (cfg, seed) = (&self.cfg, rollout_seed(self.seed, micro, r));
            let c = sample_completions(model, prompt, 1, (cfg.max_new_tokens, cfg.temperature, cfg.eos), seed, &device)?;
            completions.push(c.into_iter().next().unwrap_or_default());
        }
        let pairs: Vec<(&[u32], &[u32])> = prompts.iter().zip(&completions).map(|(p, c)| (*p, &c[..])).collect();
        let rows: Vec<Vec<u32>> = pairs.iter().map(|(p, c)| p.iter().chain(c.iter()).copied().collect()).collect();
        let scores = self.reward.score(&rows, &device)?;
        let batch = prompt_completion_batch(&pairs, &device)?;
        let (old_logp, old_values, reference) = with_no_grad(|| {
            let (lp, v) = self.read(model, &batch)?;
            let reference = crate::nn::with_adapters_off(|| token_log_probs(model, &batch)?.to_vec_f64())?;
            Ok::<_, Error>((lp.to_vec_f64()?, v.to_vec_f64()?, reference))
        })?;
        let width = batch.ids.shape()[1];
        // Completion token j of row i is predicted at position prompt_i + j − 1.
        let at: Vec<Vec<usize>> =
            pairs.iter().enumerate().map(|(i, (p, c))| (p.len()..p.len() + c.len()).map(|j| i * width + j - 1).collect()).collect();
        let (mut advantages, mut returns) = (Vec::new(), Vec::new());
        let (mut kl, mut tokens) = (0.0, 0.0);
        for (i, pos) in at.iter().enumerate() {
            let pick = |v: &[f64]| pos.iter().map(|&p| v[p]).collect::<Vec<f64>>();
            let (lp, rf, vals) = (pick(&old_logp), pick(&reference), pick(&old_values));
            kl += lp.iter().zip(&rf).map(|(a, b)| a - b).sum::<f64>();
            tokens += pos.len() as f64;
            let rewards = token_rewards(scores[i], &lp, &rf, self.cfg.kl_coef);
            let (a, r) = gae(&rewards, &vals, self.cfg.gamma, self.cfg.lam);
            advantages.push(a);
            returns.push(r);
        }
        // Whitened over all the micro-batch's completion tokens.
        let mut flat: Vec<f64> = advantages.iter().flatten().copied().collect();
        whiten(&mut flat);
        let mut it = flat.into_iter();
        for a in advantages.iter_mut() {
            a.iter_mut().for_each(|v| *v = it.next().expect("as many"));
        }
        Ok(Rollout { batch, at, old_logp, old_values, advantages, returns, score: scores.iter().sum(), kl, tokens })
    }

    /// The clipped losses of a rollout under log-probs `lp` and values `v` (flat): the sum over
    /// completions of their per-token means, its gradients, and (clipped fraction, policy
    /// loss, value loss) summed likewise.
    fn losses(&self, r: &Rollout, lp: &[f64], v: &[f64]) -> (f64, Vec<f64>, Vec<f64>, [f64; 3]) {
        let (mut total, mut glp, mut gv) = (0.0, vec![0.0; lp.len()], vec![0.0; v.len()]);
        let mut parts = [0.0; 3];
        for (i, pos) in r.at.iter().enumerate() {
            let n = pos.len().max(1) as f64;
            let (mut pg, mut vf, mut clipped) = (0.0, 0.0, 0.0);
            for (k, &p) in pos.iter().enumerate() {
                let a = r.advantages[i][k];
                let (l, g) = policy_loss(lp[p], r.old_logp[p], a, self.cfg.cliprange);
                pg += l;
                glp[p] = g / n;
                // TRL's clip fraction: the tokens where the clipped term is the larger.
                let ratio = (lp[p] - r.old_logp[p]).exp();
                if -a * ratio.clamp(1.0 - self.cfg.cliprange, 1.0 + self.cfg.cliprange) > -a * ratio {
                    clipped += 1.0;
                }
                let (l, g) = value_loss(v[p], r.old_values[p], r.returns[i][k], self.cfg.cliprange_value);
                vf += l;
                gv[p] = self.cfg.vf_coef * g / n;
            }
            total += (pg + self.cfg.vf_coef * vf) / n;
            parts[0] += clipped / n;
            parts[1] += pg / n;
            parts[2] += vf / n;
        }
        (total, glp, gv, parts)
    }
}

impl Objective for Ppo {
    fn name(&self) -> &'static str {
        "ppo"
    }

    /// One unit per completion (one per prompt): the loss is their mean.
    fn units(&self, _model: &dyn CausalLm, b: &Batch) -> usize {
        b.lengths.len()
    }

    fn parameters(&self) -> Vec<(String, Tensor)> {
        let mut p = vec![("value_head.weight".to_string(), self.value.weight.clone())];
        p.extend(self.value.bias.clone().map(|b| ("value_head.bias".to_string(), b)));
        p
    }

    fn set_step(&self, micro: u64) {
        self.step.store(micro, Ordering::Relaxed);
    }

    fn updates_per_step(&self) -> usize {
        self.cfg.epochs
    }

    fn set_update(&self, update: Option<usize>) {
        *self.update.lock().expect("not poisoned") = update;
        if update.is_none() {
            self.rollouts.lock().expect("not poisoned").clear();
        }
    }

    fn dropout(&self) -> bool {
        false
    }

    fn batch_loss(&self, model: &dyn CausalLm, b: &Batch, _count_correct: bool) -> Result<BatchLoss> {
        if b.pairs.is_some() || b.n_target_tokens > 0 {
            return Err(Error::InvalidArgument { op: "ppo", msg: "PPO trains on prompts alone ({\"prompt\"} lines)".into() });
        }
        let micro = self.step.load(Ordering::Relaxed);
        let update = *self.update.lock().expect("not poisoned");
        let cached = update.and_then(|_| self.rollouts.lock().expect("not poisoned").get(&micro).cloned());
        let (r, fresh) = match cached {
            Some(r) => (r, false),
            None => {
                let r = Arc::new(self.rollout(model, b, micro)?);
                if update.is_some() {
                    self.rollouts.lock().expect("not poisoned").insert(micro, r.clone());
                }
                (r, true)
            }
        };
        // The first read of a fresh rollout is the rollout's own (the policy has not moved):
        // outside training no second forward is needed.
        let (loss, parts) = if fresh && update.is_none() {
            let (l, _, _, parts) = self.losses(&r, &r.old_logp, &r.old_values);
            (Tensor::scalar(l as f32, b.ids.device())?, parts)
        } else {
            let (lp, v) = self.read(model, &r.batch)?;
            let (l, glp, gv, parts) = self.losses(&r, &lp.to_vec_f64()?, &v.to_vec_f64()?);
            (host_loss(&lp, l, glp)?.add(&host_loss(&v, 0.0, gv)?)?, parts)
        };
        let metrics = vec![
            ("reward", r.score),
            ("kl", r.kl),
            ("completion_length", r.tokens),
            ("clipfrac", parts[0]),
            ("policy_loss", parts[1]),
            ("value_loss", parts[2]),
        ];
        Ok(BatchLoss { sum: loss, correct: None, metrics, sampled_tokens: r.tokens as usize })
    }
}
