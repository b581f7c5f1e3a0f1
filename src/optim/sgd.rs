//! Stochastic gradient descent with optional momentum, as PyTorch's `torch.optim.SGD`.

use std::collections::HashMap;

use super::{check_lr, checked_grad, collect_state, validate_groups, EntryKind, Optimizer, ParamGroup};
use crate::autograd::no_grad;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

const OP: &str = "sgd";

/// The hyper-parameters shared by all groups (PyTorch's defaults: no momentum, no dampening,
/// no Nesterov).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct SgdConfig {
    /// Momentum factor μ (0: plain SGD, no state).
    pub momentum: f64,
    /// Dampening τ of the gradient added to the momentum buffer.
    pub dampening: f64,
    /// Nesterov momentum (needs μ > 0 and τ = 0, as in PyTorch).
    pub nesterov: bool,
}

/// SGD over parameter groups. For a parameter `p` with gradient `g` in a group with learning
/// rate `η = lr·lr_scale` and weight decay `λ` (coupled: added to the gradient):
///
/// ```text
/// d ← g + λ p
/// if μ ≠ 0:  b ← d at the parameter's first step, else b ← μ b + (1 − τ) d
///            d ← d + μ b  (Nesterov)  or  d ← b
/// p ← p − η d
/// ```
///
/// as `torch.optim.SGD`, with tensor ops on the parameter's device in its dtype.
///
/// Checkpoint state ([`Optimizer::state_tensors`]): with momentum, `"<name>.momentum_buffer"`
/// (b, the parameter's shape and dtype) for each parameter that has taken a step; none without.
#[derive(Debug)]
pub struct Sgd {
    groups: Vec<ParamGroup>,
    config: SgdConfig,
    /// Momentum buffers keyed by parameter name.
    buffers: HashMap<String, Tensor>,
}

impl Sgd {
    pub fn new(groups: Vec<ParamGroup>, config: SgdConfig) -> Result<Sgd> {
        for (what, v) in [("momentum", config.momentum), ("dampening", config.dampening)] {
            if !v.is_finite() || v < 0.0 {
                return Err(Error::InvalidArgument { op: OP, msg: format!("{what} must be finite and >= 0, got {v}") });
            }
        }
        if config.nesterov && (config.momentum <= 0.0 || config.dampening != 0.0) {
            return Err(Error::InvalidArgument {
                op: OP,
                msg: format!("Nesterov momentum needs momentum > 0 and dampening 0, got {} and {}", config.momentum, config.dampening),
            });
        }
        validate_groups(OP, &groups)?;
        Ok(Sgd { groups, config, buffers: HashMap::new() })
    }

    pub fn config(&self) -> SgdConfig {
        self.config
    }
}

impl Optimizer for Sgd {
    fn step(&mut self, lr: f64) -> Result<()> {
        check_lr(OP, lr)?;
        let _g = no_grad();
        let mut work = Vec::new();
        for g in &self.groups {
            for (name, p) in &g.params {
                if let Some(grad) = checked_grad(OP, name, p)? {
                    work.push((g.lr_scale, g.weight_decay, name, p, grad));
                }
            }
        }
        let SgdConfig { momentum, dampening, nesterov } = self.config;
        for (lr_scale, weight_decay, name, p, grad) in work {
            let p_now = p.detach();
            let mut d = if weight_decay != 0.0 { grad.add(&p_now.mul_scalar(weight_decay)?)? } else { grad };
            if momentum != 0.0 {
                let buf = match self.buffers.get(name.as_str()) {
                    Some(b) => b.mul_scalar(momentum)?.add(&d.mul_scalar(1.0 - dampening)?)?,
                    None => d.compact()?,
                };
                d = if nesterov { d.add(&buf.mul_scalar(momentum)?)? } else { buf.clone() };
                self.buffers.insert(name.clone(), buf);
            }
            let fresh = p_now.sub(&d.mul_scalar(lr * lr_scale)?)?;
            p.replace_storage(fresh.storage_arc())?;
        }
        Ok(())
    }

    fn groups(&self) -> &[ParamGroup] {
        &self.groups
    }

    fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let names = self.groups.iter().flat_map(|g| g.params.iter()).map(|(n, _)| n);
        Ok(names.filter_map(|n| self.buffers.get(n).map(|b| (format!("{n}.momentum_buffer"), b.clone()))).collect())
    }

    fn load_state(&mut self, named: &HashMap<String, Tensor>) -> Result<()> {
        let found = collect_state(OP, &self.groups, named, &[("momentum_buffer", EntryKind::LikeParam)])?;
        let mut buffers = HashMap::new();
        for ((name, _), s) in self.groups.iter().flat_map(|g| g.params.iter()).zip(found) {
            if let Some(mut s) = s {
                buffers.insert(name.clone(), s.swap_remove(0));
            }
        }
        self.buffers = buffers;
        Ok(())
    }
}
