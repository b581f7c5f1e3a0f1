//! Optimizers, learning-rate schedules and gradient clipping.
//!
//! - [`AdamW`] (PyTorch's `torch.optim.AdamW`: decoupled weight decay) and [`Sgd`] (PyTorch's
//!   `torch.optim.SGD`: coupled weight decay, optional momentum), both over named
//!   [`ParamGroup`]s with their own learning-rate multiplier and weight decay, both behind the
//!   [`Optimizer`] trait so a trainer can hold either;
//! - [`Schedule`]: constant, linear and cosine learning rates with linear warm-up (Hugging
//!   Face's `get_*_schedule_with_warmup`);
//! - [`clip_grad_norm`] / [`grad_norm`]: the global L2 norm of the gradients
//!   (`torch.nn.utils.clip_grad_norm_`).
//!
//! The trainer computes the scheduled learning rate and passes it to [`Optimizer::step`]; a
//! group's learning rate is that rate times its `lr_scale`. Parameters are updated by swapping
//! their storage for the kernel's output, so on the GPU the data never visits the host.
//!
//! ```
//! use tinytune::optim::{AdamW, Optimizer, ParamGroup, Schedule, ScheduleKind};
//! use tinytune::{DType, Device, Tensor};
//!
//! let w = Tensor::ones(&[2, 2], DType::F32, &Device::Cpu)?.requires_grad()?;
//! let mut opt = AdamW::new(vec![ParamGroup::new("all", vec![("w".into(), w.clone())], 1.0, 0.01)])?;
//! let sched = Schedule::new(ScheduleKind::Cosine, 10, 100)?;
//! for step in 0..3 {
//!     w.sum_all()?.backward()?;
//!     opt.step(sched.lr_at(1e-3, step))?;
//!     opt.zero_grad();
//! }
//! assert!(w.to_vec::<f32>()?[0] < 1.0);
//! # Ok::<(), tinytune::Error>(())
//! ```

mod adamw;
mod clip;
mod schedule;
mod sgd;

use std::collections::{BTreeSet, HashMap, HashSet};

pub use adamw::{AdamW, AdamWConfig};
pub use clip::{clip_grad_norm, grad_norm};
pub use schedule::{Schedule, ScheduleKind};
pub use sgd::{Sgd, SgdConfig};

use crate::backend::Device;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// A set of named parameters sharing a learning-rate multiplier and a weight decay (e.g. "decay"
/// for matrices and "no_decay" for biases and norms, or a head trained 10× faster than the body).
#[derive(Debug, Clone)]
pub struct ParamGroup {
    /// The group's name, for error messages.
    pub name: String,
    /// `(name, tensor)`: the name keys the optimizer state (`"<name>.exp_avg"`, ...) and must be
    /// unique over all groups; the tensor is the trainable leaf (a clone of the model's handle).
    pub params: Vec<(String, Tensor)>,
    /// The group's learning rate is `lr · lr_scale` for the `lr` given to [`Optimizer::step`].
    pub lr_scale: f64,
    /// Weight-decay coefficient λ of this group (decoupled for AdamW, coupled for SGD).
    pub weight_decay: f64,
}

impl ParamGroup {
    pub fn new(name: impl Into<String>, params: Vec<(String, Tensor)>, lr_scale: f64, weight_decay: f64) -> ParamGroup {
        ParamGroup { name: name.into(), params, lr_scale, weight_decay }
    }
}

/// What a trainer needs from an optimizer.
pub trait Optimizer {
    /// One update of every trainable parameter that has a gradient, with base learning rate `lr`
    /// (group `g` uses `lr · g.lr_scale`). Parameters whose gradient is `None` are left alone
    /// and get no state.
    fn step(&mut self, lr: f64) -> Result<()>;

    /// The parameter groups, in the order given at construction.
    fn groups(&self) -> &[ParamGroup];

    /// Clear the gradient of every parameter.
    fn zero_grad(&self) {
        for g in self.groups() {
            for (_, p) in &g.params {
                p.zero_grad();
            }
        }
    }

    /// Every `(name, parameter)`, group by group.
    fn params(&self) -> Vec<(String, Tensor)> {
        self.groups().iter().flat_map(|g| g.params.iter().cloned()).collect()
    }

    /// The optimizer state for a checkpoint, as named tensors `"<param name>.<entry>"` in
    /// parameter order (only parameters that have state). Entries are documented per optimizer.
    /// The tensors are snapshots: later steps do not change them.
    fn state_tensors(&self) -> Result<Vec<(String, Tensor)>>;

    /// Replace the state with `named` (as made by [`Optimizer::state_tensors`], on any device).
    /// A parameter may have no entries (no state yet) or all of them; a missing entry, an
    /// entry for an unknown parameter, or a wrong shape or dtype is an error naming the entry,
    /// and leaves the current state unchanged.
    fn load_state(&mut self, named: &HashMap<String, Tensor>) -> Result<()>;
}

/// Check the groups an optimizer is built from: finite non-negative `lr_scale` and
/// `weight_decay`, unique parameter names and tensors, float parameters whose layout can be
/// updated in place (contiguous at offset 0, as every leaf made by a constructor).
pub(crate) fn validate_groups(op: &'static str, groups: &[ParamGroup]) -> Result<()> {
    let mut names = HashSet::new();
    let mut ids = HashMap::new();
    for g in groups {
        for (what, v) in [("lr_scale", g.lr_scale), ("weight_decay", g.weight_decay)] {
            if !v.is_finite() || v < 0.0 {
                return Err(Error::InvalidArgument { op, msg: format!("group {:?}: {what} must be finite and >= 0, got {v}", g.name) });
            }
        }
        for (name, p) in &g.params {
            if !names.insert(name.as_str()) {
                return Err(Error::InvalidArgument { op, msg: format!("group {:?}: parameter name {name:?} appears twice", g.name) });
            }
            if let Some(other) = ids.insert(p.id(), name.as_str()) {
                return Err(Error::InvalidArgument {
                    op,
                    msg: format!("group {:?}: parameter {name:?} is the same tensor as {other:?}", g.name),
                });
            }
            if !p.dtype().is_compute() {
                return Err(Error::InvalidArgument {
                    op,
                    msg: format!("parameter {name:?} has dtype {:?}; only f32 and f64 tensors can be trained", p.dtype()),
                });
            }
            if !p.is_contiguous() || p.layout().offset() != 0 {
                return Err(Error::InvalidArgument {
                    op,
                    msg: format!("parameter {name:?} is a strided view; pass the leaf tensor itself (contiguous, offset 0)"),
                });
            }
        }
    }
    Ok(())
}

/// A base learning rate must be finite and non-negative.
pub(crate) fn check_lr(op: &'static str, lr: f64) -> Result<()> {
    if !lr.is_finite() || lr < 0.0 {
        return Err(Error::InvalidArgument { op, msg: format!("learning rate must be finite and >= 0, got {lr}") });
    }
    Ok(())
}

/// The gradient of a trainable parameter, checked against it; `None` when it has none (or is
/// frozen), so the step skips it.
pub(crate) fn checked_grad(op: &'static str, name: &str, p: &Tensor) -> Result<Option<Tensor>> {
    if !p.requires_grad_flag() {
        return Ok(None);
    }
    let Some(g) = p.grad() else { return Ok(None) };
    if g.shape() != p.shape() || g.dtype() != p.dtype() || g.device() != p.device() {
        return Err(Error::InvalidArgument {
            op,
            msg: format!(
                "parameter {name:?} is {:?} {:?} on {} but its gradient is {:?} {:?} on {}",
                p.shape(),
                p.dtype(),
                p.device(),
                g.shape(),
                g.dtype(),
                g.device()
            ),
        });
    }
    Ok(Some(g))
}

/// What one state entry of a parameter looks like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EntryKind {
    /// The parameter's shape and dtype, on its device (moments, momentum buffers).
    LikeParam,
    /// A rank-0 U32 step counter (kept on the CPU).
    Count,
}

/// Pick each parameter's state out of `named`: for every parameter either no entry (no state,
/// `None`) or all of `entries`, checked and moved to the parameter's device. Every key of
/// `named` must belong to a parameter.
pub(crate) fn collect_state(
    op: &'static str,
    groups: &[ParamGroup],
    named: &HashMap<String, Tensor>,
    entries: &[(&str, EntryKind)],
) -> Result<Vec<Option<Vec<Tensor>>>> {
    let mut used: BTreeSet<String> = BTreeSet::new();
    let mut out = Vec::new();
    for (name, p) in groups.iter().flat_map(|g| g.params.iter()) {
        let keys: Vec<String> = entries.iter().map(|(e, _)| format!("{name}.{e}")).collect();
        let found: Vec<Option<&Tensor>> = keys.iter().map(|k| named.get(k)).collect();
        if found.iter().all(Option::is_none) {
            out.push(None);
            continue;
        }
        let mut state = Vec::new();
        for ((key, t), (_, kind)) in keys.iter().zip(&found).zip(entries) {
            let t = t.ok_or_else(|| Error::InvalidArgument {
                op,
                msg: format!("optimizer state entry {key:?} is missing (other entries of parameter {name:?} are present)"),
            })?;
            let (shape, dtype) = match kind {
                EntryKind::LikeParam => (p.shape(), p.dtype()),
                EntryKind::Count => (&[][..], DType::U32),
            };
            if t.shape() != shape || t.dtype() != dtype {
                return Err(Error::InvalidArgument {
                    op,
                    msg: format!("optimizer state entry {key:?} is {:?} {:?}, expected {shape:?} {dtype:?}", t.shape(), t.dtype()),
                });
            }
            let dev = if *kind == EntryKind::Count { &Device::Cpu } else { p.device() };
            state.push(t.detach().to_device(dev)?.compact()?.detach());
            used.insert(key.clone());
        }
        out.push(Some(state));
    }
    let mut unknown: Vec<&String> = named.keys().filter(|k| !used.contains(*k)).collect();
    if !unknown.is_empty() {
        unknown.sort();
        let valid: Vec<&str> = entries.iter().map(|(e, _)| *e).collect();
        return Err(Error::InvalidArgument {
            op,
            msg: format!(
                "optimizer state has entries for no parameter of this optimizer: {unknown:?} (expected \"<param name>.<entry>\" with entry one of {valid:?})"
            ),
        });
    }
    Ok(out)
}

/// A step counter as a rank-0 U32 tensor on the CPU.
pub(crate) fn count_tensor(op: &'static str, name: &str, step: u64) -> Result<Tensor> {
    let v = u32::try_from(step).map_err(|_| Error::InvalidArgument {
        op,
        msg: format!("step count {step} of parameter {name:?} does not fit a u32 state entry"),
    })?;
    Tensor::from_vec(vec![v], &[], &Device::Cpu)
}

/// The value of a [`count_tensor`].
pub(crate) fn count_value(t: &Tensor) -> Result<u64> {
    Ok(u64::from(t.to_vec::<u32>()?[0]))
}
