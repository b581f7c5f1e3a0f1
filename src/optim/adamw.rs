//! AdamW: Adam with decoupled weight decay (Loshchilov & Hutter), as PyTorch's
//! `torch.optim.AdamW` (no amsgrad, no maximize).

use std::collections::HashMap;
use std::sync::Arc;

use super::{check_lr, checked_grad, collect_state, count_tensor, count_value, validate_groups, EntryKind, Optimizer, ParamGroup};
use crate::backend::AdamWStep;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

const OP: &str = "adamw";

/// The hyper-parameters shared by all groups (PyTorch's defaults: β1 0.9, β2 0.999, eps 1e-8).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
}

impl Default for AdamWConfig {
    fn default() -> AdamWConfig {
        AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8 }
    }
}

/// The state of one parameter: its own step count `t` and the two moment estimates.
#[derive(Debug, Clone)]
struct ParamState {
    step: u64,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

/// AdamW over parameter groups. For a parameter `p` with gradient `g` in a group with learning
/// rate `η = lr·lr_scale` and weight decay `λ`, step `t` (counted per parameter, from 1) does
///
/// ```text
/// p ← p·(1 − η λ)
/// m ← β1 m + (1 − β1) g
/// v ← β2 v + (1 − β2) g²
/// p ← p − η/(1 − β1ᵗ) · m / (√v / √(1 − β2ᵗ) + eps)
/// ```
///
/// exactly as `torch.optim.AdamW`, in one fused kernel ([`crate::backend::Storage::adamw_step`])
/// on the parameter's device, in its dtype. `m` and `v` start at zero and are created at a
/// parameter's first step with a gradient, on its device.
///
/// Checkpoint state ([`Optimizer::state_tensors`]): per parameter with state,
/// `"<name>.exp_avg"` (m), `"<name>.exp_avg_sq"` (v), both of the parameter's shape and dtype,
/// and `"<name>.step"`, a rank-0 U32 tensor holding `t`.
#[derive(Debug)]
pub struct AdamW {
    groups: Vec<ParamGroup>,
    config: AdamWConfig,
    /// Keyed by parameter name (unique over the groups).
    state: HashMap<String, ParamState>,
}

impl AdamW {
    /// PyTorch's default weight decay for AdamW.
    pub const DEFAULT_WEIGHT_DECAY: f64 = 0.01;

    /// AdamW with PyTorch's default β1, β2 and eps.
    pub fn new(groups: Vec<ParamGroup>) -> Result<AdamW> {
        AdamW::with_config(groups, AdamWConfig::default())
    }

    /// One group `"default"` with `lr_scale` 1 and the default weight decay 0.01.
    pub fn with_defaults(params: Vec<(String, Tensor)>) -> Result<AdamW> {
        AdamW::new(vec![ParamGroup::new("default", params, 1.0, AdamW::DEFAULT_WEIGHT_DECAY)])
    }

    /// AdamW with explicit hyper-parameters: `0 ≤ β1, β2 < 1`, `eps ≥ 0`.
    pub fn with_config(groups: Vec<ParamGroup>, config: AdamWConfig) -> Result<AdamW> {
        for (what, v) in [("beta1", config.beta1), ("beta2", config.beta2)] {
            if !(0.0..1.0).contains(&v) {
                return Err(Error::InvalidArgument { op: OP, msg: format!("{what} must be in [0, 1), got {v}") });
            }
        }
        if !config.eps.is_finite() || config.eps < 0.0 {
            return Err(Error::InvalidArgument { op: OP, msg: format!("eps must be finite and >= 0, got {}", config.eps) });
        }
        validate_groups(OP, &groups)?;
        Ok(AdamW { groups, config, state: HashMap::new() })
    }

    pub fn config(&self) -> AdamWConfig {
        self.config
    }

    /// The number of steps parameter `name` has taken (`None`: no state yet).
    pub fn param_steps(&self, name: &str) -> Option<u64> {
        self.state.get(name).map(|s| s.step)
    }
}

impl Optimizer for AdamW {
    fn step(&mut self, lr: f64) -> Result<()> {
        check_lr(OP, lr)?;
        // Check every gradient before changing anything, so a bad one leaves all parameters as
        // they were.
        let mut work = Vec::new();
        for g in &self.groups {
            for (name, p) in &g.params {
                if let Some(grad) = checked_grad(OP, name, p)? {
                    work.push((g.lr_scale, g.weight_decay, name, p, grad));
                }
            }
        }
        for (lr_scale, weight_decay, name, p, grad) in work {
            let state = match self.state.get(name.as_str()) {
                Some(s) => s.clone(),
                None => ParamState { step: 0, exp_avg: p.zeros_like()?, exp_avg_sq: p.zeros_like()? },
            };
            let step = state.step + 1;
            let h = AdamWStep {
                lr: lr * lr_scale,
                beta1: self.config.beta1,
                beta2: self.config.beta2,
                eps: self.config.eps,
                weight_decay,
                step,
            };
            let (np, m, v) = p.storage_arc().adamw_step(
                p.layout(),
                &grad.storage_arc(),
                grad.layout(),
                &state.exp_avg.storage_arc(),
                &state.exp_avg_sq.storage_arc(),
                &h,
            )?;
            p.replace_storage(Arc::new(np))?;
            let shape = p.shape();
            self.state.insert(
                name.clone(),
                ParamState { step, exp_avg: Tensor::from_storage(m, shape), exp_avg_sq: Tensor::from_storage(v, shape) },
            );
        }
        Ok(())
    }

    fn groups(&self) -> &[ParamGroup] {
        &self.groups
    }

    fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for (name, _) in self.groups.iter().flat_map(|g| g.params.iter()) {
            if let Some(s) = self.state.get(name) {
                out.push((format!("{name}.exp_avg"), s.exp_avg.clone()));
                out.push((format!("{name}.exp_avg_sq"), s.exp_avg_sq.clone()));
                out.push((format!("{name}.step"), count_tensor(OP, name, s.step)?));
            }
        }
        Ok(out)
    }

    fn load_state(&mut self, named: &HashMap<String, Tensor>) -> Result<()> {
        let entries = [("exp_avg", EntryKind::LikeParam), ("exp_avg_sq", EntryKind::LikeParam), ("step", EntryKind::Count)];
        let found = collect_state(OP, &self.groups, named, &entries)?;
        let mut state = HashMap::new();
        for ((name, _), s) in self.groups.iter().flat_map(|g| g.params.iter()).zip(found) {
            if let Some(mut s) = s {
                let step = count_value(&s[2])?;
                let exp_avg_sq = s.swap_remove(1);
                let exp_avg = s.swap_remove(0);
                state.insert(name.clone(), ParamState { step, exp_avg, exp_avg_sq });
            }
        }
        self.state = state;
        Ok(())
    }
}
