//! Preference objectives on pairs of a chosen and a rejected completion of one prompt
//! ([`DataKind::Preference`](super::data::DataKind::Preference) data): DPO and a reward model.
//!
//! # DPO (Rafailov et al., 2023)
//!
//! With `π_c = log πθ(y_c | x)` and `π_r = log πθ(y_r | x)` the policy's log-probabilities of the
//! chosen and rejected completions (summed over their tokens), `ρ_c`, `ρ_r` the reference's, and
//! `h = (π_c − ρ_c) − (π_r − ρ_r)`, the loss of a pair is
//!
//! ```text
//! sigmoid:  ℓ = −(1 − ε) log σ(β h) − ε log σ(−β h)        (ε: label smoothing, 0 by default)
//! ipo:      ℓ = (h − 1/(2β))²                               (log-probabilities averaged per token)
//! ```
//!
//! the mean over pairs; the implicit rewards are `β(π_c − ρ_c)` and `β(π_r − ρ_r)`. These are the
//! losses and the metrics (`rewards/chosen`, `rewards/rejected`, `rewards/accuracies`,
//! `rewards/margins`, `logps/chosen`, `logps/rejected`) of TRL's `DPOTrainer`, IPO (Azar et al.,
//! 2023) on per-token means as TRL computes it.
//!
//! The reference is the model with its adapters switched off ([`crate::nn::adapters_off`]): no
//! second copy of the weights. With [`compute_reference_log_probs`] the reference's values are
//! computed once, before training, and carried by the data, so a step runs one model; a method
//! that trains the base weights themselves (full fine-tuning) has no adapters-off reference and
//! needs them.
//!
//! # Reward model
//!
//! A scalar head on the final hidden state of the last real token, `r(x, y)`, trained with the
//! Bradley–Terry loss `ℓ = −log σ(r(x, y_c) − r(x, y_r))`; saved as the adapter and a head of
//! one output.
//!
//! The policy's log-probabilities come from [`crate::nn::linear_cross_entropy_rows`] (the output
//! layer in chunks); the loss of the few pairs is computed in float64 on the host with its
//! gradient in closed form ([`host_loss`]), which backward hands to the log-probabilities.

use super::data::{Batch, Dataset};
use super::objective::{BatchLoss, Objective};
use crate::autograd::with_no_grad;
use crate::error::{Error, Result};
use crate::models::CausalLm;
use crate::peft::ClassifierHead;
use crate::tensor::Tensor;

/// What a run on preference pairs trains.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PreferenceObjective {
    Dpo(DpoConfig),
    /// A reward model (a one-output head and the method's adapter).
    Reward,
    /// GRPO on `{"prompt"}` data with [`super::TrainConfig::reward_model`].
    Grpo(super::grpo::GrpoConfig),
    /// PPO on `{"prompt"}` data with [`super::TrainConfig::reward_model`] and a value head.
    Ppo(super::ppo::PpoConfig),
}

/// The DPO loss's form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DpoLoss {
    /// `−log σ(β h)` (with label smoothing: the conservative DPO of Mitchell, 2023).
    Sigmoid,
    /// IPO's squared loss `(h − 1/(2β))²` on per-token mean log-probabilities.
    Ipo,
}

impl std::str::FromStr for DpoLoss {
    type Err = Error;
    fn from_str(s: &str) -> Result<DpoLoss> {
        match s {
            "sigmoid" => Ok(DpoLoss::Sigmoid),
            "ipo" => Ok(DpoLoss::Ipo),
            _ => Err(Error::InvalidArgument { op: "--dpo-loss", msg: format!("unknown DPO loss '{s}' (sigmoid or ipo)") }),
        }
    }
}

/// DPO's settings (TRL's defaults: β 0.1, the sigmoid loss, no label smoothing).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DpoConfig {
    pub beta: f64,
    pub loss: DpoLoss,
    /// ε in `[0, 0.5)`: the probability that a pair's preference is flipped (sigmoid loss only).
    pub label_smoothing: f64,
}

impl Default for DpoConfig {
    fn default() -> Self {
        DpoConfig { beta: 0.1, loss: DpoLoss::Sigmoid, label_smoothing: 0.0 }
    }
}

impl DpoConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::InvalidArgument { op: "dpo", msg });
        if !(self.beta > 0.0 && self.beta.is_finite()) {
            return bad(format!("--beta must be positive, got {}", self.beta));
        }
        if !(0.0..0.5).contains(&self.label_smoothing) {
            return bad(format!("--label-smoothing must be in [0, 0.5), got {}", self.label_smoothing));
        }
        if self.label_smoothing > 0.0 && self.loss == DpoLoss::Ipo {
            return bad("--label-smoothing applies to the sigmoid loss, not ipo".into());
        }
        Ok(())
    }
}

/// `log σ(z) = −(max(−z, 0) + ln(1 + e^{−|z|}))`, without overflow.
pub fn log_sigmoid(z: f64) -> f64 {
    -((-z).max(0.0) + (-z.abs()).exp().ln_1p())
}

/// `σ(z)`, without overflow.
pub fn sigmoid(z: f64) -> f64 {
    if z >= 0.0 {
        1.0 / (1.0 + (-z).exp())
    } else {
        let e = z.exp();
        e / (1.0 + e)
    }
}

/// One pair's DPO loss and what follows from it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DpoPair {
    pub loss: f64,
    /// `∂ℓ/∂π_c` and `∂ℓ/∂π_r` (with respect to the summed log-probabilities).
    pub d_chosen: f64,
    pub d_rejected: f64,
    /// The implicit rewards `β(π_c − ρ_c)`, `β(π_r − ρ_r)` (per-token means for IPO).
    pub reward_chosen: f64,
    pub reward_rejected: f64,
}

/// The DPO loss of one pair from the summed log-probabilities of the policy (`pc`, `pr`) and
/// the reference (`rc`, `rr`) and the completions' token counts (`nc`, `nr`; IPO averages).
pub fn dpo_pair(cfg: &DpoConfig, pc: f64, pr: f64, rc: f64, rr: f64, nc: usize, nr: usize) -> DpoPair {
    let (sc, sr) = match cfg.loss {
        DpoLoss::Sigmoid => (1.0, 1.0),
        DpoLoss::Ipo => (1.0 / nc.max(1) as f64, 1.0 / nr.max(1) as f64),
    };
    let (lc, lr) = (sc * (pc - rc), sr * (pr - rr));
    let h = lc - lr;
    let (loss, dh) = match cfg.loss {
        DpoLoss::Sigmoid => {
            let (z, e) = (cfg.beta * h, cfg.label_smoothing);
            (-(1.0 - e) * log_sigmoid(z) - e * log_sigmoid(-z), cfg.beta * (-(1.0 - e) * sigmoid(-z) + e * sigmoid(z)))
        }
        DpoLoss::Ipo => {
            let d = h - 1.0 / (2.0 * cfg.beta);
            (d * d, 2.0 * d)
        }
    };
    DpoPair { loss, d_chosen: dh * sc, d_rejected: -dh * sr, reward_chosen: cfg.beta * lc, reward_rejected: cfg.beta * lr }
}

/// A scalar loss of `x` whose value (`value`) and gradient `∂ value/∂x` (`grad`, `x`'s shape,
/// flat) were computed on the host: backward gives `x` the incoming gradient times `grad`.
pub fn host_loss(x: &Tensor, value: f64, grad: Vec<f64>) -> Result<Tensor> {
    if grad.len() != x.numel() {
        return Err(Error::Shape { op: "host_loss", msg: format!("{} gradient values for a tensor of shape {:?}", grad.len(), x.shape()) });
    }
    let device = x.device();
    let out = Tensor::scalar(value as f32, device)?;
    if !crate::autograd::is_grad_enabled() || !x.requires_grad_flag() {
        return Ok(out);
    }
    let g = Tensor::from_vec(grad.iter().map(|&v| v as f32).collect::<Vec<_>>(), x.shape(), device)?;
    Ok(Tensor::from_op_shared(out.storage_arc(), &[], "host_loss", &[x], move |up| Ok(vec![Some(g.mul(&up.reshape(&[1])?)?)])))
}

/// The summed log-probability of each row's target tokens, `[rows]` (with the graph, when it
/// is recorded): `−Σ_t CE` through the output layer in chunks.
pub fn sequence_log_probs(model: &dyn CausalLm, b: &Batch) -> Result<Tensor> {
    let h = model.forward_hidden(&b.ids, b.keep.as_ref(), None, false)?;
    crate::nn::linear_cross_entropy_rows(model.lm_head(), &h.last, &b.targets, -100)?.neg()
}

/// The summed log-probability of each of `completions` after `prompt` (their tokens as
/// generated, not re-encoded from text), without a graph: one padded batch of the rows
/// `prompt + completion`, loss on the completion's tokens.
pub fn completion_log_probs(model: &dyn CausalLm, prompt: &[u32], completions: &[Vec<u32>], device: &crate::Device) -> Result<Vec<f64>> {
    let b = completion_batch(prompt, completions, device)?;
    with_no_grad(|| sequence_log_probs(model, &b)?.to_vec_f64())
}

/// The rows `prompt + completion` as one right-padded batch, targets on each completion's
/// tokens (token `j` of a completion predicted at position `prompt.len() + j − 1`).
pub fn completion_batch(prompt: &[u32], completions: &[Vec<u32>], device: &crate::Device) -> Result<Batch> {
    if prompt.is_empty() || completions.is_empty() {
        return Err(Error::InvalidArgument { op: "completion_log_probs", msg: "need a prompt and at least one completion".into() });
    }
    let pairs: Vec<(&[u32], &[u32])> = completions.iter().map(|c| (prompt, &c[..])).collect();
    prompt_completion_batch(&pairs, device)
}

/// One padded batch of the rows `prompt_i + completion_i`, the loss on each completion's tokens.
pub fn prompt_completion_batch(pairs: &[(&[u32], &[u32])], device: &crate::Device) -> Result<Batch> {
    let rows: Vec<(Vec<u32>, Vec<bool>)> = pairs
        .iter()
        .map(|(p, c)| (p.iter().chain(c.iter()).copied().collect(), (0..p.len() + c.len()).map(|j| j >= p.len()).collect()))
        .collect();
    let rows: Vec<(&[u32], &[bool])> = rows.iter().map(|(i, t)| (&i[..], &t[..])).collect();
    Batch::from_rows(&rows, 0, device)
}

/// The reference's summed log-probabilities of each row: the model with its adapters off,
/// without a graph.
pub fn reference_log_probs(model: &dyn CausalLm, b: &Batch) -> Result<Vec<f64>> {
    with_no_grad(|| crate::nn::with_adapters_off(|| sequence_log_probs(model, b)?.to_vec_f64()))
}

/// Every pair's reference log-probabilities `(chosen, rejected)`, in the data's order, in
/// batches of `batch_size` pairs: one pass before training, so that a DPO step holds one
/// model's activations.
pub fn compute_reference_log_probs(
    model: &dyn CausalLm,
    data: &Dataset,
    batch_size: usize,
    device: &crate::Device,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<(f64, f64)>> {
    let mut out = vec![(0.0, 0.0); data.len()];
    let order = data.by_length();
    let mut done = 0;
    for chunk in order.chunks(batch_size.max(1)) {
        let b = data.batch(chunk, device)?;
        let lp = reference_log_probs(model, &b)?;
        for (k, &i) in chunk.iter().enumerate() {
            out[i] = (lp[k], lp[k + chunk.len()]);
        }
        done += chunk.len();
        progress(done, data.len());
    }
    Ok(out)
}

/// The number of pairs of a preference batch, or an error naming the objective.
fn pairs(b: &Batch, objective: &str) -> Result<usize> {
    b.pairs.ok_or_else(|| Error::InvalidArgument {
        op: "finetune",
        msg: format!("{objective} trains on preference pairs ({{\"prompt\", \"chosen\", \"rejected\"}} lines)"),
    })
}

/// Targets per row of a batch.
fn targets_per_row(b: &Batch) -> Result<Vec<usize>> {
    let t = b.ids.shape()[1];
    let v = b.targets.to_vec::<i32>()?;
    Ok(v.chunks(t.max(1)).map(|r| r.iter().filter(|&&x| x != -100).count()).collect())
}

/// DPO against the adapters-off model (or the reference log-probabilities the data carries).
pub struct Dpo {
    pub cfg: DpoConfig,
    /// Whether the adapters-off model is the reference. `false` for a method that trains the
    /// base weights: the data must then carry the reference's log-probabilities.
    pub live_reference: bool,
}

impl Objective for Dpo {
    fn name(&self) -> &'static str {
        "dpo"
    }

    fn units(&self, _model: &dyn CausalLm, b: &Batch) -> usize {
        b.pairs.unwrap_or(0)
    }

    fn batch_loss(&self, model: &dyn CausalLm, b: &Batch, count_correct: bool) -> Result<BatchLoss> {
        let n = pairs(b, "dpo")?;
        let reference: Vec<f64> = match &b.reference {
            Some(r) => r.iter().map(|p| p.0).chain(r.iter().map(|p| p.1)).collect(),
            None if self.live_reference => reference_log_probs(model, b)?,
            None => {
                return Err(Error::InvalidArgument {
                    op: "dpo",
                    msg: "the method trains the base weights, so the adapters-off model is not the reference: compute the \
                          reference log-probabilities first (--precompute-ref-log-probs)"
                        .into(),
                })
            }
        };
        let logps = sequence_log_probs(model, b)?;
        let p = logps.to_vec_f64()?;
        let counts = targets_per_row(b)?;
        let (mut loss, mut grad) = (0.0, vec![0.0; 2 * n]);
        let mut m = Metrics::default();
        for i in 0..n {
            let d = dpo_pair(&self.cfg, p[i], p[n + i], reference[i], reference[n + i], counts[i], counts[n + i]);
            loss += d.loss;
            (grad[i], grad[n + i]) = (d.d_chosen, d.d_rejected);
            m.add(d.reward_chosen, d.reward_rejected, p[i], p[n + i]);
        }
        let correct = count_correct.then_some(m.correct);
        Ok(BatchLoss { sum: host_loss(&logps, loss, grad)?, correct, metrics: m.into_sums(true), sampled_tokens: 0 })
    }
}

/// Sums over pairs of the metrics TRL reports.
#[derive(Default)]
struct Metrics {
    chosen: f64,
    rejected: f64,
    logp_chosen: f64,
    logp_rejected: f64,
    correct: usize,
    pairs: usize,
}

impl Metrics {
    fn add(&mut self, chosen: f64, rejected: f64, logp_chosen: f64, logp_rejected: f64) {
        self.chosen += chosen;
        self.rejected += rejected;
        self.logp_chosen += logp_chosen;
        self.logp_rejected += logp_rejected;
        self.correct += (chosen > rejected) as usize;
        self.pairs += 1;
    }

    fn into_sums(self, logps: bool) -> Vec<(&'static str, f64)> {
        let mut v = vec![
            ("rewards/chosen", self.chosen),
            ("rewards/rejected", self.rejected),
            ("rewards/accuracies", self.correct as f64),
            ("rewards/margins", self.chosen - self.rejected),
        ];
        if logps {
            v.extend([("logps/chosen", self.logp_chosen), ("logps/rejected", self.logp_rejected)]);
        }
        v
    }
}

/// The Bradley–Terry loss of a scalar head on the last real token.
pub struct RewardModelling {
    pub head: ClassifierHead,
}

/// The reward `r(x, y)` of every row of a batch, `[rows]`, by a one-output head.
pub fn rewards(model: &dyn CausalLm, head: &ClassifierHead, b: &Batch) -> Result<Tensor> {
    if head.num_classes() != 1 {
        return Err(Error::InvalidArgument {
            op: "reward",
            msg: format!("a reward model's head has one output; this one has {} (a classifier)", head.num_classes()),
        });
    }
    let scores = head.forward(&model.hidden_states(&b.ids, b.keep.as_ref(), None)?, b.keep.as_ref())?;
    scores.reshape(&[b.lengths.len() as isize])
}

/// The reward of every row of every example of `data`, in the data's order, without a graph:
/// one score per example (per pair: the chosen's then the rejected's, `2 × len` values).
pub fn reward_scores(
    model: &dyn CausalLm,
    head: &ClassifierHead,
    data: &Dataset,
    batch_size: usize,
    device: &crate::Device,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<f64>> {
    with_no_grad(|| {
        let rows = if data.kind() == super::data::DataKind::Preference { 2 } else { 1 };
        let mut out = vec![0.0; rows * data.len()];
        let order = data.by_length();
        let mut done = 0;
        for chunk in order.chunks(batch_size.max(1)) {
            let v = rewards(model, head, &data.batch(chunk, device)?)?.to_vec_f64()?;
            for (k, &i) in chunk.iter().enumerate() {
                for r in 0..rows {
                    out[rows * i + r] = v[r * chunk.len() + k];
                }
            }
            done += chunk.len();
            progress(done, data.len());
        }
        Ok(out)
    })
}

impl Objective for RewardModelling {
    fn name(&self) -> &'static str {
        "reward"
    }

    fn units(&self, _model: &dyn CausalLm, b: &Batch) -> usize {
        b.pairs.unwrap_or(0)
    }

    fn batch_loss(&self, model: &dyn CausalLm, b: &Batch, count_correct: bool) -> Result<BatchLoss> {
        let n = pairs(b, "a reward model")?;
        let r = rewards(model, &self.head, b)?;
        let v = r.to_vec_f64()?;
        let (mut loss, mut grad) = (0.0, vec![0.0; 2 * n]);
        let mut m = Metrics::default();
        for i in 0..n {
            // ℓ = −log σ(Δ), Δ = r_c − r_r: ∂ℓ/∂r_c = −σ(−Δ) = −∂ℓ/∂r_r.
            let delta = v[i] - v[n + i];
            loss -= log_sigmoid(delta);
            (grad[i], grad[n + i]) = (-sigmoid(-delta), sigmoid(-delta));
            m.add(v[i], v[n + i], 0.0, 0.0);
        }
        let correct = count_correct.then_some(m.correct);
        Ok(BatchLoss { sum: host_loss(&r, loss, grad)?, correct, metrics: m.into_sums(false), sampled_tokens: 0 })
    }

    fn parameters(&self) -> Vec<(String, Tensor)> {
        self.head.parameters()
    }

    fn head(&self) -> Option<&ClassifierHead> {
        Some(&self.head)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The closed-form gradients against central differences in float64.
    #[test]
    fn dpo_pair_gradients_match_finite_differences() {
        for cfg in [
            DpoConfig::default(),
            DpoConfig { beta: 0.5, loss: DpoLoss::Sigmoid, label_smoothing: 0.2 },
            DpoConfig { beta: 0.3, loss: DpoLoss::Ipo, label_smoothing: 0.0 },
        ] {
            for &(pc, pr, rc, rr) in &[(-12.0, -15.0, -13.0, -14.0), (-40.0, -3.0, -41.5, -2.0), (-5.0, -5.0, -5.0, -5.0)] {
                let d = dpo_pair(&cfg, pc, pr, rc, rr, 7, 3);
                let e = 1e-5;
                let num_c = (dpo_pair(&cfg, pc + e, pr, rc, rr, 7, 3).loss - dpo_pair(&cfg, pc - e, pr, rc, rr, 7, 3).loss) / (2.0 * e);
                let num_r = (dpo_pair(&cfg, pc, pr + e, rc, rr, 7, 3).loss - dpo_pair(&cfg, pc, pr - e, rc, rr, 7, 3).loss) / (2.0 * e);
                assert!((d.d_chosen - num_c).abs() < 1e-7, "{cfg:?}: {} vs {num_c}", d.d_chosen);
                assert!((d.d_rejected - num_r).abs() < 1e-7, "{cfg:?}: {} vs {num_r}", d.d_rejected);
            }
        }
    }

    /// At the start (policy = reference) the sigmoid loss is log 2 and pulls with β/2.
    #[test]
    fn dpo_at_the_reference() {
        let d = dpo_pair(&DpoConfig::default(), -9.0, -4.0, -9.0, -4.0, 3, 2);
        assert!((d.loss - std::f64::consts::LN_2).abs() < 1e-15);
        assert!((d.d_chosen + 0.05).abs() < 1e-15 && (d.d_rejected - 0.05).abs() < 1e-15);
        assert_eq!((d.reward_chosen, d.reward_rejected), (0.0, 0.0));
    }

    #[test]
    fn log_sigmoid_is_stable() {
        assert!((log_sigmoid(0.0) + std::f64::consts::LN_2).abs() < 1e-15);
        assert_eq!(log_sigmoid(800.0), 0.0);
        assert!((log_sigmoid(-800.0) + 800.0).abs() < 1e-9);
        assert!((sigmoid(-800.0)).abs() < 1e-300 && sigmoid(800.0) == 1.0);
    }
}
