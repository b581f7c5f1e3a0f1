//! Layers: linear, embedding, norms and attention, each a thin struct over tensors and the
//! engine's ops. Every layer has the Hugging Face module path it was loaded from (`name`),
//! the site that fine-tuning methods attach to.

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// A fine-tuning method attached to a [`Linear`] site (LoRA, DoRA, ...). When a linear has
/// an adapter, the adapter computes the whole output from the frozen base layer and the
/// input, so a method can change the math of the site without the model code knowing it.
pub trait LinearAdapter: Send + Sync + std::fmt::Debug {
    /// `y: [rows, out]` for `x: [rows, in]` (leading axes already flattened), given the
    /// base layer (its weight, bias and name).
    fn forward(&self, base: &Linear, x: &Tensor) -> Result<Tensor>;
    /// For downcasting to the method's own type (saving, merging).
    fn as_any(&self) -> &dyn std::any::Any;
}

/// `y = x Wᵀ + b` with `W: [out, in]` (PyTorch `nn.Linear` layout), plus an optional
/// fine-tuning adapter that replaces the computation (see [`LinearAdapter`]).
#[derive(Debug, Clone)]
pub struct Linear {
    pub name: String,
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub adapter: Option<std::sync::Arc<dyn LinearAdapter>>,
}

impl Linear {
    pub fn new(name: impl Into<String>, weight: Tensor, bias: Option<Tensor>) -> Linear {
        Linear { name: name.into(), weight, bias, adapter: None }
    }

    pub fn in_features(&self) -> usize {
        self.weight.shape()[1]
    }

    pub fn out_features(&self) -> usize {
        self.weight.shape()[0]
    }

    /// Apply to `x: [.., in]`. Leading axes are flattened so the product is one large matmul;
    /// an attached adapter computes the output instead of the plain product.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let in_f = self.in_features();
        if x.shape().last() != Some(&in_f) {
            return Err(Error::Shape { op: "linear", msg: format!("{}: input {:?} does not end in {in_f}", self.name, x.shape()) });
        }
        let mut out_shape = x.shape().to_vec();
        *out_shape.last_mut().expect("rank ≥ 1 checked") = self.out_features();
        let rows = x.numel() / in_f.max(1);
        let x2 = x.reshape(&[rows as isize, in_f as isize])?;
        let y = match &self.adapter {
            Some(adapter) => adapter.forward(self, &x2)?,
            None => self.forward_base(&x2)?,
        };
        y.reshape(&out_shape.iter().map(|&d| d as isize).collect::<Vec<_>>())
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
    /// `x / √(mean(x²) + eps) ⊙ w`
    Rms { name: String, weight: Tensor, eps: f64 },
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
            Norm::Rms { weight, eps, .. } => x.rms_norm(Some(weight), *eps),
            Norm::Layer { weight, bias, eps, .. } => x.layer_norm(Some(weight), Some(bias), *eps),
        }
    }
}

/// The additive attention bias for `tq` queries that are the last of `tk` positions: causal,
/// plus padding when `keep: [batch, tk]` (1 real token, 0 padding) is given. Shape `[tq, tk]`,
/// or `[batch, 1, tq, tk]` with padding. Built once per forward and shared by every layer.
pub fn attention_bias(tq: usize, tk: usize, keep: Option<&Tensor>, dtype: DType, device: &crate::Device) -> Result<Tensor> {
    let causal = Tensor::causal_mask(tq, tk, dtype, device)?;
    let mask = match keep {
        None => causal,
        Some(keep) => {
            if keep.rank() != 2 || keep.shape()[1] != tk {
                return Err(Error::Shape { op: "attention", msg: format!("keep mask must be [batch, {tk}], got {:?}", keep.shape()) });
            }
            let b = keep.shape()[0] as isize;
            causal.mul(&keep.to_dtype(dtype)?.reshape(&[b, 1, 1, tk as isize])?)?
        }
    };
    mask.mask_to_bias()
}

/// Scaled dot-product attention `softmax(q kᵀ/√d + bias) v` with `q: [b, h, tq, d]`,
/// `k, v: [b, h, tk, d]` and an additive `bias` from [`attention_bias`].
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor) -> Result<Tensor> {
    if q.rank() != 4 || k.rank() != 4 || v.rank() != 4 {
        return Err(Error::Shape {
            op: "attention",
            msg: format!("q, k, v must be [b, h, t, d], got {:?}, {:?}, {:?}", q.shape(), k.shape(), v.shape()),
        });
    }
    let d = q.shape()[3];
    let scores = q.matmul(&k.t()?)?.mul_scalar(1.0 / (d as f64).sqrt())?;
    scores.add(bias)?.softmax(-1)?.matmul(v)
}

/// Repeat each of `n_kv` key/value heads `rep` times along the head axis:
/// `[b, n_kv, t, d] → [b, n_kv·rep, t, d]` (grouped-query attention).
pub fn repeat_kv(x: &Tensor, rep: usize) -> Result<Tensor> {
    if rep == 1 {
        return Ok(x.clone());
    }
    if x.rank() != 4 {
        return Err(Error::Shape { op: "repeat_kv", msg: format!("expected [b, h, t, d], got {:?}", x.shape()) });
    }
    let s = x.shape().to_vec();
    let (b, h, t, d) = (s[0], s[1], s[2], s[3]);
    x.unsqueeze(2)?.broadcast_to(&[b, h, rep, t, d])?.contiguous()?.reshape(&[b as isize, (h * rep) as isize, t as isize, d as isize])
}

/// The dtype weights are computed in (f32; storage dtypes are converted on load).
pub const COMPUTE: DType = DType::F32;
