//! PPO's arithmetic for RLHF (Ouyang et al. 2022; TRL's `PPOTrainer` conventions), on one
//! completion of `n` tokens at a time. The rollout loop that drives it (a value head, several
//! epochs of minibatches per rollout) is not built yet; these are its tested parts.
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

/// TRL's defaults: `kl_coef 0.05`, `cliprange 0.2`, `cliprange_value 0.2`, `vf_coef 0.1`,
/// `gamma 1`, `lam 0.95`, 4 epochs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PpoConfig {
    pub kl_coef: f64,
    pub cliprange: f64,
    pub cliprange_value: f64,
    pub vf_coef: f64,
    pub gamma: f64,
    pub lam: f64,
    pub epochs: usize,
}

impl Default for PpoConfig {
    fn default() -> Self {
        PpoConfig { kl_coef: 0.05, cliprange: 0.2, cliprange_value: 0.2, vf_coef: 0.1, gamma: 1.0, lam: 0.95, epochs: 4 }
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
