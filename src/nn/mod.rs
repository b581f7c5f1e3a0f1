//! Layers: linear, embedding, norms, attention and the decoder block, each a thin struct
//! over tensors and the engine's ops. Every layer has the Hugging Face module path it was
//! loaded from (`name`): the sites that fine-tuning methods attach to are named by it.
//!
//! The sites:
//! - `linear` ([`LinearAdapter`], at every [`Linear`]): before (transform the input), replace
//!   (compute the output from the base layer and the input) or after (transform the output);
//! - `attn.kv`, `mlp.act`, `attn.out`, `mlp.out`, `block.out` ([`BlockHook`], at every
//!   [`DecoderBlock`]);
//! - `input` ([`InputHook`], at the [`Decoder`]): virtual tokens before the embedded input;
//! - the adapters-off scope ([`adapters_off`]): inside it every site runs the base model.

pub mod attention;
pub mod block;
pub mod xent;

pub use attention::{attention, attention_reference, repeat_kv, Mask};
pub use block::{
    without_packing, Activation, BlockConfig, BlockHook, Decoder, DecoderBlock, Hidden, InputHook, KvCache, LocalAttention, Mlp, Qkv, Rope,
    SelfAttention,
};
pub use xent::{linear_cross_entropy_rows, linear_cross_entropy_rows_chunked, linear_cross_entropy_sum, linear_cross_entropy_sum_chunked};

use std::cell::Cell;
use std::sync::Arc;

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

thread_local! {
    static ADAPTERS_ON: Cell<bool> = const { Cell::new(true) };
}

/// Whether the methods attached at the sites run on this thread (see [`adapters_off`]).
pub fn adapters_enabled() -> bool {
    ADAPTERS_ON.with(|a| a.get())
}

/// Switches every attached method off until dropped (restores the previous state), like
/// [`crate::autograd::no_grad`]: `let _off = adapters_off();` and the model is its base model,
/// with no second copy of the weights. For DPO's and PPO's reference policy and for
/// evaluating the base model with an adapter attached.
pub fn adapters_off() -> AdaptersGuard {
    AdaptersGuard { prev: ADAPTERS_ON.with(|a| a.replace(false)) }
}

/// Run `f` with every attached method switched off.
pub fn with_adapters_off<R>(f: impl FnOnce() -> R) -> R {
    let _off = adapters_off();
    f()
}

/// Restores the adapters' previous state when dropped.
pub struct AdaptersGuard {
    prev: bool,
}

impl Drop for AdaptersGuard {
    fn drop(&mut self) {
        ADAPTERS_ON.with(|a| a.set(self.prev));
    }
}

/// The adapters' state at one moment, to run code later under it (the recomputation of a
/// checkpointed block in backward must see what the forward saw).
#[derive(Debug, Clone, Copy)]
pub(crate) struct AdaptersScope(bool);

impl AdaptersScope {
    pub(crate) fn current() -> AdaptersScope {
        AdaptersScope(adapters_enabled())
    }

    pub(crate) fn run<R>(self, f: impl FnOnce() -> R) -> R {
        let _g = AdaptersGuard { prev: ADAPTERS_ON.with(|a| a.replace(self.0)) };
        f()
    }
}

/// Where at a [`Linear`] a method acts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinearSite {
    /// On the input: `x → x'`, then the product (IA³ on a feed-forward input).
    Before,
    /// Instead of the product: `(base, x) → y` (LoRA, DoRA). At most one per linear.
    Replace,
    /// On the output: `y → y'` (IA³ on keys and values).
    After,
}

/// A fine-tuning method attached to a [`Linear`] site. A method that scales an input or an
/// output takes [`LinearSite::Before`] or [`LinearSite::After`] and never re-implements
/// `x Wᵀ + b`; one that changes the product itself takes [`LinearSite::Replace`].
pub trait LinearAdapter: Send + Sync + std::fmt::Debug {
    fn site(&self) -> LinearSite;
    /// `Before`: `t` is the input `[rows, in]`, returns the new input. `Replace`: `t` is the
    /// input, returns `y: [rows, out]` computed from the base layer (its weight, bias and
    /// name). `After`: `t` is the output `[rows, out]`, returns the new output. Leading axes
    /// are already flattened.
    fn forward(&self, base: &Linear, t: &Tensor) -> Result<Tensor>;
    /// For downcasting to the method's own type (saving, merging).
    fn as_any(&self) -> &dyn std::any::Any;
}

/// `y = x Wᵀ + b` with `W: [out, in]` (PyTorch `nn.Linear` layout), plus the fine-tuning
/// methods attached at it (see [`LinearAdapter`]).
#[derive(Debug, Clone)]
pub struct Linear {
    pub name: String,
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    /// Attached methods, applied in order (before → the one replace, or the base → after).
    pub adapters: Vec<Arc<dyn LinearAdapter>>,
}

impl Linear {
    pub fn new(name: impl Into<String>, weight: Tensor, bias: Option<Tensor>) -> Linear {
        Linear { name: name.into(), weight, bias, adapters: Vec::new() }
    }

    pub fn in_features(&self) -> usize {
        self.weight.shape()[1]
    }

    pub fn out_features(&self) -> usize {
        self.weight.shape()[0]
    }

    /// Apply to `x: [.., in]`. Leading axes are flattened so the product is one large matmul.
    /// Attached methods run at their sites, unless inside [`adapters_off`].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let in_f = self.in_features();
        if x.shape().last() != Some(&in_f) {
            return Err(Error::Shape { op: "linear", msg: format!("{}: input {:?} does not end in {in_f}", self.name, x.shape()) });
        }
        let mut out_shape = x.shape().to_vec();
        *out_shape.last_mut().expect("rank ≥ 1 checked") = self.out_features();
        let rows = x.numel() / in_f.max(1);
        let x2 = x.reshape(&[rows as isize, in_f as isize])?;
        let y = if self.adapters.is_empty() || !adapters_enabled() {
            self.forward_base(&x2)?
        } else {
            let at = |site| self.adapters.iter().filter(move |a| a.site() == site);
            let x2 = at(LinearSite::Before).try_fold(x2, |x, a| a.forward(self, &x))?;
            let y = match at(LinearSite::Replace).next() {
                Some(a) => a.forward(self, &x2)?,
                None => self.forward_base(&x2)?,
            };
            at(LinearSite::After).try_fold(y, |y, a| a.forward(self, &y))?
        };
        y.reshape(&out_shape.iter().map(|&d| d as isize).collect::<Vec<_>>())
    }

    /// Attach a method at this linear; a second [`LinearSite::Replace`] is an error.
    pub fn attach(&mut self, adapter: Arc<dyn LinearAdapter>) -> Result<()> {
        if adapter.site() == LinearSite::Replace && self.adapters.iter().any(|a| a.site() == LinearSite::Replace) {
            return Err(Error::InvalidArgument {
                op: "attach",
                msg: format!("{} already has an adapter that replaces its product (LoRA or DoRA); a linear takes one", self.name),
            });
        }
        self.adapters.push(adapter);
        Ok(())
    }

    /// Call `f` on `{name}.weight` and `{name}.bias` (checkpoint names); `f` may replace them.
    pub fn visit_parameters(&mut self, f: &mut dyn FnMut(&str, &mut Tensor) -> Result<()>) -> Result<()> {
        f(&format!("{}.weight", self.name), &mut self.weight)?;
        if let Some(b) = self.bias.as_mut() {
            f(&format!("{}.bias", self.name), b)?;
        }
        Ok(())
    }

    /// The base layer alone on `x: [rows, in]`: `x Wᵀ + b`, ignoring any adapter.
    pub fn forward_base(&self, x: &Tensor) -> Result<Tensor> {
        let y = x.matmul(&self.weight.t()?)?;
        match &self.bias {
            Some(b) => y.add(b),
            None => Ok(y),
        }
    }
}

/// A lookup table `[vocab, dim]`.
#[derive(Debug, Clone)]
pub struct Embedding {
    pub name: String,
    pub weight: Tensor,
}

impl Embedding {
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        self.weight.embedding(ids)
    }
}

/// Which normalisation a model uses.
#[derive(Debug, Clone)]
pub enum Norm {
    /// `x / √(mean(x²) + eps) ⊙ w`, or `⊙ (1 + w)` with `unit_offset` (Gemma, whose
    /// checkpoints store `w` centred on 0; the weight kept here is the checkpoint's).
    Rms { name: String, weight: Tensor, eps: f64, unit_offset: bool },
    /// `(x − μ)/√(σ² + eps) ⊙ w + b`
    Layer { name: String, weight: Tensor, bias: Tensor, eps: f64 },
}

impl Norm {
    /// Call `f` on `{name}.weight` (and `{name}.bias`), by checkpoint name.
    pub fn visit_parameters(&mut self, f: &mut dyn FnMut(&str, &mut Tensor) -> Result<()>) -> Result<()> {
        match self {
            Norm::Rms { name, weight, .. } => f(&format!("{name}.weight"), weight),
            Norm::Layer { name, weight, bias, .. } => {
                f(&format!("{name}.weight"), weight)?;
                f(&format!("{name}.bias"), bias)
            }
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Norm::Rms { weight, eps, unit_offset: false, .. } => x.rms_norm(Some(weight), *eps),
            Norm::Rms { weight, eps, unit_offset: true, .. } => x.rms_norm(Some(&weight.add_scalar(1.0)?), *eps),
            Norm::Layer { weight, bias, eps, .. } => x.layer_norm(Some(weight), Some(bias), *eps),
        }
    }
}

/// The dtype weights are computed in (f32; storage dtypes are converted on load).
pub const COMPUTE: DType = DType::F32;
